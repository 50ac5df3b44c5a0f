//! Command-line definitions (clap). Each command's work lives in `cmd/`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "lunafront",
    version = lunafront::LONG_VERSION,
    about = "A declarative front server for HAProxy: desired state in YAML, validated, compiled, planned and applied."
)]
pub struct Cli {
    /// When to colour output: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Format of the logs on stderr: text, or json (one object per event).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What `lunafront generate` writes (for packagers).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Generated {
    /// The man pages (roff): lunafront.1 and lunafront-COMMAND.1, into --out DIR.
    Man,
    CompleteBash,
    CompleteZsh,
    CompleteFish,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Args, Debug, Clone)]
pub struct StateArg {
    /// A state file, or a directory of *.yaml files (merged).
    #[arg(env = "LUNAFRONT_STATE", default_value = ".")]
    pub state: PathBuf,
}

/// `lunafront daemon --git URL …`: a fleet's nodes follow one repository.
#[derive(Args, Debug, Clone)]
pub struct GitArgs {
    /// Follow this git repository: the state folder is a clone the daemon manages (cloned
    /// when missing or empty), moved forward to each new commit that passes the checks, and the
    /// API's changes are committed and pushed to it. A password in the URL is never shown; set
    /// it in $LUNAFRONT_GIT_URL to keep it out of the process list too.
    #[arg(
        long,
        value_name = "URL",
        env = "LUNAFRONT_GIT_URL",
        hide_env_values = true
    )]
    pub git: Option<String>,
    /// The branch to follow.
    #[arg(long, default_value = "main", requires = "git")]
    pub branch: String,
    /// How often to fetch (also on POST /reconcile and POST /hooks/git).
    #[arg(long, default_value = "10s", value_parser = parse_duration, requires = "git")]
    pub git_interval: std::time::Duration,
    /// SSH private key for the remote (used through GIT_SSH_COMMAND).
    #[arg(long, value_name = "FILE", requires = "git")]
    pub git_key: Option<PathBuf>,
    /// Follow the branch when it is rewritten (force-pushed); by default such a commit is
    /// refused and reported.
    #[arg(long, requires = "git")]
    pub allow_rewrite: bool,
    /// Accept only commits signed by a key of this allowed-signers file (ssh-keygen's format;
    /// git verify-commit checks them).
    #[arg(long, value_name = "ALLOWED_SIGNERS", requires = "git")]
    pub require_signed: Option<PathBuf>,
    /// SSH key the API signs its commits with (needed with --require-signed and --api).
    #[arg(long, value_name = "FILE", requires = "git")]
    pub git_signing_key: Option<PathBuf>,
    /// File holding the shared secret of POST /hooks/git (a forge's push webhook, signed with
    /// X-Hub-Signature-256 or X-Gitlab-Token); without it the hook is off.
    #[arg(long, value_name = "FILE", requires = "git")]
    pub git_hook_secret_file: Option<PathBuf>,
    /// Longest a git command may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration, requires = "git")]
    pub git_timeout: std::time::Duration,
}

#[derive(Subcommand, Debug)]
pub enum FleetAction {
    /// Ask each daemon's /status which commit it runs, and which nodes lag or fail.
    Status {
        /// Each node's daemon address (http://HOST:PORT, the daemon's --listen).
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
        /// Print `{"format_version", "in_sync", "nodes": […]}` on stdout.
        #[arg(long)]
        json: bool,
        /// How long each node may take to answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentAction {
    /// Create a one-time enrollment token: the agent registers with it as its key.
    Enroll {
        /// The agent's id.
        name: String,
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        target: Option<String>,
        /// How long the token stays valid.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        valid: std::time::Duration,
        #[arg(long, value_name = "DIR")]
        api_data: Option<PathBuf>,
        /// Print `{"agent", "token", "expires_at"}` as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Revoke every token of an agent.
    Revoke {
        name: String,
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        target: Option<String>,
        #[arg(long, value_name = "DIR")]
        api_data: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check the desired state: YAML, schema and semantic rules, all problems in one run.
    Validate {
        #[command(flatten)]
        state: StateArg,
        /// Print diagnostics as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Also render the state and run `haproxy -c` on it, and check every certificate
        /// (parses, its key matches, not expired; a warning 30 days before it expires).
        #[arg(long)]
        check: bool,
        /// With --check: render for this target's paths and use its haproxy binary.
        #[arg(long)]
        target: Option<String>,
    },
    /// Compile the state into haproxy.cfg, map files and certificates in a folder.
    Render {
        #[command(flatten)]
        state: StateArg,
        /// Folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Render for this target's paths (runtime socket, maps folder).
        #[arg(long)]
        target: Option<String>,
    },
    /// Show what applying the state would change on a target.
    Plan {
        #[command(flatten)]
        state: StateArg,
        /// The target(s) or group(s) to compare with (needed when the state has several).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 2 when there are changes, 0 when there are none, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Save the plan (with the files it would write) for `apply --plan FILE`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Apply the state to a target: plan, confirm, then runtime API or reload; rollback on failure.
    Apply {
        #[command(flatten)]
        state: StateArg,
        /// Target(s) or group(s); with several, the first is the canary.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// After the canary, apply to this many targets at a time.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Apply without asking (needed when stdin is not a terminal).
        #[arg(long)]
        auto_approve: bool,
        /// Apply a plan saved by `plan --out FILE` (refused if the target changed since).
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        /// Print the plans and each target's result as one JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// Apply even when the change removes more domains or backends than
        /// `global.delete_guard` lets through (by default more than 10 and more than 10%).
        #[arg(long)]
        allow_deletes: bool,
    },
    /// Put back an earlier applied state of a target.
    Rollback {
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        target: Option<String>,
        /// How many applies to go back.
        #[arg(long, default_value_t = 1)]
        steps: u64,
        #[arg(long)]
        auto_approve: bool,
        /// Print the plan and the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the applied states a target keeps, newest first.
    History {
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        target: Option<String>,
        /// Print the entries as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Keep a target converged with the state folder: watch it, reconcile, serve health and metrics.
    Daemon {
        #[command(flatten)]
        state: StateArg,
        /// A haproxy target (driven locally), or a dataplane target or a group (rolled out as
        /// `apply` does: the canary and its health check first).
        #[arg(long)]
        target: String,
        /// With a group: after the canary, apply to this many targets at a time.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Address of the health/status/metrics endpoints.
        #[arg(long, default_value = "127.0.0.1:9180")]
        listen: std::net::SocketAddr,
        /// Run HAProxy as a child (as `spawn: true` does); its sockets stay where the state puts
        /// them, so `plan` and `apply` reach the same HAProxy.
        #[arg(long)]
        spawn: bool,
        /// How often to check for drift (hand edits of files or of HAProxy's runtime state).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        interval: std::time::Duration,
        /// Serve the agent registration and admin API on this address.
        #[arg(long, value_name = "ADDR")]
        api: Option<std::net::SocketAddr>,
        /// File holding the admin token (else $LUNAFRONT_ADMIN_TOKEN; without either, no admin).
        #[arg(long, value_name = "FILE")]
        admin_token_file: Option<PathBuf>,
        /// Where the API keeps tokens and its private CA (default: <target state_dir>/api).
        #[arg(long, value_name = "DIR")]
        api_data: Option<PathBuf>,
        #[command(flatten)]
        git: Box<GitArgs>,
    },
    /// A fleet of daemons following one git repository.
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// Manage agents' credentials for the API.
    Agent {
        #[command(subcommand)]
        action: AgentAction,
    },
    /// Print the JSON Schema of the state format.
    Schema,
    /// Translate an existing haproxy.cfg (per-host ACL chains or host maps) into a state file.
    Import {
        /// The HAProxy configuration to read.
        config: PathBuf,
        /// Where to write the state (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print the state and what could not be translated as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write the man page or a shell completion script on stdout (for packagers).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
        /// For `man`: the folder to write lunafront.1 and a page per command into.
        #[arg(long, value_name = "DIR", required_if_eq("what", "man"))]
        out: Option<PathBuf>,
    },
    /// Run demo HTTP apps (NAME=ADDRESS:PORT ...) standing in for an agent, for the quickstart.
    DemoBackends {
        #[arg(required = true, value_name = "NAME=ADDRESS:PORT")]
        apps: Vec<String>,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    lunafront::model::names::parse_duration(text).map(|d| d.as_std())
}
