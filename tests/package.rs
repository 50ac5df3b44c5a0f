//! The Debian package, built and installed as an operator would: `scripts/package` (cargo-deb)
//! builds the .deb, which is installed with dpkg in a clean Debian bookworm root made by
//! debootstrap (minbase, plus the package's dependencies and systemd for `systemd-analyze`);
//! there `lunafront --version` names the commit, the example state validates (and HAProxy
//! 2.6 of that root accepts its rendering), the dedicated user is in the haproxy group, the
//! unit passes `systemd-analyze verify`, and the man pages and completions are in place.
//!
//! The root is cached between runs (debootstrap fetches from Debian's mirror once): in
//! `$LUNAFRONT_DEBIAN_ROOT_CACHE`, else /var/cache/lunafront/bookworm-deb-test; each run
//! installs into a copy. Needs root (chroot), debootstrap and cargo-deb (scripts/setup
//! installs them); without them the test fails, it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn ok(command: &mut Command) -> String {
    let shown = format!("{command:?}");
    let out = run(command);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cached clean root, made once (under a lock, so parallel runs wait for one debootstrap).
fn debian_root() -> PathBuf {
    let root = std::env::var_os("LUNAFRONT_DEBIAN_ROOT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/lunafront/bookworm-deb-test"));
    let complete = root.join(".lunafront-root-complete");
    if complete.exists() {
        return root;
    }
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(root.with_extension("lock")).unwrap();
    lock.lock().unwrap();
    if !complete.exists() {
        let partial = root.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        ok(Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=haproxy,systemd,procps",
                "bookworm",
            ])
            .arg(&partial));
        std::fs::write(partial.join(".lunafront-root-complete"), "").unwrap();
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&partial, &root).unwrap();
    }
    root
}

/// Builds the .deb from the binary the tests run (`--profile dev --no-build`: the same
/// assets, scripts and unit as a release build, without compiling everything again).
fn build_deb(out: &Path) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_lunafront"));
    let target_dir = bin.parent().unwrap().parent().unwrap();
    ok(Command::new(repo().join("scripts/package"))
        .args(["--profile", "dev", "--no-build", "--quiet", "--output"])
        .arg(out)
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(repo()));
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("scripts/package wrote a .deb")
}

fn chroot(root: &Path, args: &[&str]) -> Output {
    run(Command::new("chroot")
        .arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8"))
}

fn chroot_ok(root: &Path, args: &[&str]) -> String {
    let out = chroot(root, args);
    assert!(
        out.status.success(),
        "chroot {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_installs_in_a_clean_debian_root_and_runs_there() {
    let work = tempfile::TempDir::new().unwrap();
    let deb = build_deb(&work.path().join("deb"));
    let cached = debian_root();
    let root = work.path().join("root");
    ok(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&cached)
        .arg(&root));
    std::fs::copy(&deb, root.join("tmp/lunafront.deb")).unwrap();

    chroot_ok(&root, &["dpkg", "-i", "/tmp/lunafront.deb"]);

    let version = chroot_ok(&root, &["lunafront", "--version"]);
    assert_eq!(
        version.trim(),
        format!("lunafront {}", lunafront::LONG_VERSION),
        "{version}"
    );
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output()
        && head.status.success()
    {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        assert!(version.contains(&head), "{version} names commit {head}");
    }

    let valid = chroot_ok(&root, &["lunafront", "validate", "/etc/lunafront"]);
    assert!(valid.contains("The state is valid"), "{valid}");
    let checked = chroot_ok(
        &root,
        &["lunafront", "validate", "--check", "/etc/lunafront"],
    );
    assert!(
        checked.contains("HAProxy accepts its rendering"),
        "{checked}"
    );

    // The dedicated user, in HAProxy's group; the example state readable by it only.
    let id = chroot_ok(&root, &["id", "lunafront"]);
    assert!(
        id.contains("(lunafront)") && id.contains("(haproxy)"),
        "{id}"
    );
    let stat = chroot_ok(
        &root,
        &["stat", "-c", "%U:%G %a", "/etc/lunafront/lunafront.yaml"],
    );
    assert_eq!(stat.trim(), "root:lunafront 640");
    let stat = chroot_ok(&root, &["stat", "-c", "%U:%G %a", "/var/lib/lunafront"]);
    assert_eq!(stat.trim(), "lunafront:lunafront 700");
    // The example is a conffile: an upgrade keeps the operator's edits.
    let conffiles = chroot_ok(
        &root,
        &["dpkg-query", "-W", "-f", "${Conffiles}", "lunafront"],
    );
    assert!(
        conffiles.contains("/etc/lunafront/lunafront.yaml"),
        "{conffiles}"
    );

    // The unit, checked by the systemd of that root.
    let verify = chroot(
        &root,
        &[
            "systemd-analyze",
            "verify",
            "--man=no",
            "/usr/lib/systemd/system/lunafront.service",
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("lunafront.service"),
        "systemd-analyze has something to say about the unit: {said}"
    );
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/lunafront.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=lunafront",
        "SupplementaryGroups=haproxy",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }

    // Man pages and completions.
    for page in [
        "lunafront.1.gz",
        "lunafront-plan.1.gz",
        "lunafront-agent-enroll.1.gz",
    ] {
        let path = root.join("usr/share/man/man1").join(page);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "{page} is gzipped");
    }
    let bash = root.join("usr/share/bash-completion/completions/lunafront");
    let complete = ok(Command::new("bash").arg("-c").arg(format!(
        "source {} && complete -p lunafront",
        bash.display()
    )));
    assert!(complete.contains("lunafront"), "{complete}");
    // zsh and fish: present and about lunafront's commands.
    for (file, needle) in [
        (
            "usr/share/zsh/vendor-completions/_lunafront",
            "#compdef lunafront",
        ),
        (
            "usr/share/fish/vendor_completions.d/lunafront.fish",
            "complete -c lunafront",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            text.contains(needle) && text.contains("detailed-exitcode"),
            "{file}"
        );
    }

    // Removing and purging leaves nothing of lunafront's state behind.
    chroot_ok(&root, &["dpkg", "--purge", "lunafront"]);
    assert!(!root.join("var/lib/lunafront").exists());
    assert!(!root.join("usr/bin/lunafront").exists());
}
