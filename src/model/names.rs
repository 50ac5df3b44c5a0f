//! The grammar of every string `validate` lets into the model: identifiers, hostnames, binds,
//! durations, paths. Each accepts only its own characters, so no value can carry HAProxy syntax
//! (spaces, `#`, quotes, `%[`, `${`, newlines) into the rendered configuration.

use std::fmt;
use std::net::IpAddr;

/// Names of listeners, agents, backends, servers, targets and groups.
pub const IDENTIFIER_RULE: &str =
    "1 to 63 characters: letters, digits, `.`, `_`, `-`, starting with a letter or digit";

pub fn is_identifier(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// File system paths the state may name (certificate folders, CA files, sockets, configs).
pub const PATH_RULE: &str = "letters, digits and `. _ / @ + -` only (no spaces, quotes or `$`)";

pub fn is_safe_path(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 4096
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'@' | b'+' | b'-')
        })
}

/// HTTP paths for health checks: an absolute path with an optional query.
pub const HTTP_PATH_RULE: &str =
    "an absolute path such as `/healthz`: letters, digits and `. _ ~ / ? = & + : @ ! , ; -`";

pub fn is_http_path(s: &str) -> bool {
    s.starts_with('/')
        && s.len() <= 1024
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_'
                        | b'~'
                        | b'/'
                        | b'?'
                        | b'='
                        | b'&'
                        | b'+'
                        | b':'
                        | b'@'
                        | b'!'
                        | b','
                        | b';'
                        | b'-'
                )
        })
}

/// Single-label names that are reserved for local or test use (RFC 6761 and friends); a
/// wildcard directly under them (`*.localhost`) is fine, unlike `*.com`.
const SPECIAL_USE: &[&str] = &[
    "localhost",
    "test",
    "example",
    "invalid",
    "local",
    "internal",
    "lan",
    "home",
];

/// A hostname problem, with the text to show and a suggestion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError {
    pub message: String,
    pub hint: String,
}

fn host_error(message: impl Into<String>, hint: impl Into<String>) -> HostError {
    HostError {
        message: message.into(),
        hint: hint.into(),
    }
}

/// Checks a domain as written in the state: a lowercase DNS name (labels of 1-63 letters,
/// digits and inner hyphens, 253 characters in all, internationalized names as punycode),
/// optionally starting with the one-label wildcard `*.`.
pub fn check_host(host: &str) -> Result<(), HostError> {
    use super::super::spec::diagnostics::quote;
    if host.is_empty() {
        return Err(host_error(
            "the domain is empty",
            "write a name such as `shop.example.com`",
        ));
    }
    if !host.is_ascii() {
        let hint = match idna::domain_to_ascii(host) {
            Ok(ascii) if ascii != host && ascii.is_ascii() && !ascii.is_empty() => format!(
                "internationalized names are written as punycode: {}; if you did not mean to use non-ASCII letters, look for a look-alike character",
                quote(&ascii)
            ),
            _ => "use only ASCII letters, digits, `-` and `.`".to_string(),
        };
        return Err(host_error(
            format!("domain {} contains non-ASCII characters", quote(host)),
            hint,
        ));
    }
    if host.len() > 253 {
        return Err(host_error(
            format!(
                "domain is {} characters long; a DNS name has at most 253",
                host.len()
            ),
            "shorten the name",
        ));
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(host_error(
            format!("domain {} has uppercase letters", quote(host)),
            format!(
                "write it in lowercase: {}",
                quote(&host.to_ascii_lowercase())
            ),
        ));
    }
    if host.ends_with('.') && host.len() > 1 {
        return Err(host_error(
            format!("domain {} ends with a dot", quote(host)),
            format!(
                "write it without the trailing dot: {}",
                quote(host.trim_end_matches('.'))
            ),
        ));
    }
    let labels: Vec<&str> = host.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if *label == "*" {
            if i != 0 {
                return Err(host_error(
                    format!("domain {} has `*` in the middle", quote(host)),
                    "a wildcard is the whole first label only, as in `*.preview.example.com`",
                ));
            }
            continue;
        }
        if label.is_empty() {
            return Err(host_error(
                format!(
                    "domain {} has an empty label (two dots in a row, or a leading dot)",
                    quote(host)
                ),
                "remove the extra dot",
            ));
        }
        if label.len() > 63 {
            return Err(host_error(
                format!(
                    "label {} is {} characters long; a DNS label has at most 63",
                    quote(label),
                    label.len()
                ),
                "shorten the label",
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            let hint = if bad == '*' {
                "a wildcard is the whole first label only, as in `*.preview.example.com`"
                    .to_string()
            } else {
                "labels hold letters, digits and inner hyphens only".to_string()
            };
            return Err(host_error(
                format!(
                    "domain {} contains {}, which is not allowed in a DNS name",
                    quote(host),
                    quote(&bad.to_string())
                ),
                hint,
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(host_error(
                format!("label {} starts or ends with a hyphen", quote(label)),
                "hyphens may only appear inside a label",
            ));
        }
        if label.starts_with("xn--") {
            let (_, result) = idna::domain_to_unicode(label);
            if result.is_err() {
                return Err(host_error(
                    format!("label {} is not valid punycode", quote(label)),
                    "convert the internationalized name with an IDNA tool",
                ));
            }
        }
    }
    let last = labels[labels.len() - 1];
    if labels.len() > 1 && last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(host_error(
            format!("domain {} looks like an IP address", quote(host)),
            "routes are by name; an all-numeric top-level label is not a DNS name",
        ));
    }
    if labels[0] == "*" {
        let parent = &labels[1..];
        if parent.is_empty() {
            return Err(host_error(
                "`*` alone would route every name",
                "write a wildcard under a domain, as in `*.preview.example.com`",
            ));
        }
        if parent.len() == 1 && !SPECIAL_USE.contains(&parent[0]) {
            return Err(host_error(
                format!("wildcard {} covers a whole top-level domain", quote(host)),
                "a wildcard needs at least two labels after `*.` (`*.apps.example.com`), except under local names such as `localhost`",
            ));
        }
    }
    Ok(())
}

/// The wildcard key HAProxy looks a host up under after the exact lookup failed: the first label
/// replaced by `*` (`a.preview.example.com` → `*.preview.example.com`).
pub fn is_wildcard(host: &str) -> bool {
    host.starts_with("*.")
}

/// Whether the one-label wildcard `pattern` (`*.x.y`) matches `host`.
pub fn wildcard_matches(pattern: &str, host: &str) -> bool {
    match (pattern.strip_prefix('*'), host.find('.')) {
        (Some(suffix), Some(dot)) => dot > 0 && &host[dot..] == suffix,
        _ => false,
    }
}

/// A listening address: an IP (or every IPv4 address) and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bind {
    pub addr: Option<IpAddr>,
    pub port: u16,
}

impl Bind {
    /// Two binds that the kernel would refuse to hold at once.
    pub fn conflicts_with(&self, other: &Bind) -> bool {
        self.port == other.port
            && match (self.addr, other.addr) {
                (None, _) | (_, None) => true,
                (Some(a), Some(b)) => a == b || a.is_unspecified() || b.is_unspecified(),
            }
    }
}

/// HAProxy's spelling of the address: `127.0.0.1:80`, `:80`, `ipv6@::1:80`.
impl fmt::Display for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            None => write!(f, ":{}", self.port),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}", self.port),
            Some(IpAddr::V6(a)) => write!(f, "ipv6@{a}:{}", self.port),
        }
    }
}

pub fn parse_bind(s: &str) -> Result<Bind, String> {
    let Some(idx) = s.rfind(':') else {
        return Err(
            "a bind is `address:port`, such as `127.0.0.1:8080`, `[::1]:8080` or `:8080`".into(),
        );
    };
    let (host, port) = (&s[..idx], &s[idx + 1..]);
    let port = parse_port(port)?;
    let addr = match host {
        "" | "*" => None,
        h if h.starts_with('[') && h.ends_with(']') => Some(
            h[1..h.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| format!("{h} is not an IPv6 address"))?,
        ),
        h if h.contains(':') => {
            return Err(format!(
                "write the IPv6 address in brackets: `[{h}]:{port}`"
            ));
        }
        h => Some(
            h.parse::<std::net::Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| {
                    format!(
                        "{} is not an IP address; a listener binds an IP (or `*`), not a name",
                        super::super::spec::diagnostics::quote(h)
                    )
                })?,
        ),
    };
    Ok(Bind { addr, port })
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range (1-65535)")),
        Err(_) => Err(format!(
            "{} is not a port number",
            super::super::spec::diagnostics::quote(s)
        )),
    }
}

/// A duration, written `250ms`, `10s`, `5m`, `1h` or `1d`, kept in milliseconds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Duration {
    pub ms: u64,
}

impl Duration {
    pub const fn from_ms(ms: u64) -> Duration {
        Duration { ms }
    }
    pub fn as_std(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.ms)
    }
}

/// The largest unit that divides evenly, so `10000ms` and `10s` render the same.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1000, "s"),
        ];
        for (size, unit) in UNITS {
            if self.ms >= size && self.ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.ms / size);
            }
        }
        write!(f, "{}ms", self.ms)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 0,
    };
    let value: u64 = if digits.is_empty() || digits.len() > 9 {
        0
    } else {
        digits.parse().unwrap_or(0)
    };
    if scale == 0 || value == 0 {
        return Err(format!(
            "{} is not a duration; write a positive number and a unit: `250ms`, `10s`, `5m`, `1h`, `1d`",
            super::super::spec::diagnostics::quote(s)
        ));
    }
    Ok(Duration { ms: value * scale })
}

/// The last line of defence, used by the one escaping filter of the templates and by the map
/// writer: a value may only hold characters that mean nothing special to HAProxy's parser.
pub fn is_config_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_'
                        | b'-'
                        | b':'
                        | b'/'
                        | b'@'
                        | b'*'
                        | b'+'
                        | b'='
                        | b','
                        | b'?'
                        | b'&'
                        | b'~'
                        | b'!'
                        | b';'
                        | b'('
                        | b')'
                )
        })
}

/// Keywords that open a section: an `extra:` line starting with one would end the section it
/// is written into and start another.
const SECTION_KEYWORDS: [&str; 16] = [
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "userlist",
    "peers",
    "resolvers",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "log-forward",
    "crt-store",
    "traces",
];

/// What an `extra:` line must be: one line of printable ASCII (no newline, CR, NUL or other
/// control character: nothing that could end the line and start another), at most 1024
/// characters, not opening a section, and expanding no environment variable (HAProxy expands
/// `$VAR` inside double quotes: a line could otherwise copy the daemon's secrets, such as the
/// admin token, into a header). What the line means is HAProxy's to judge (`haproxy -c`).
pub fn check_raw_line(line: &str) -> Result<(), String> {
    if line.trim().is_empty() {
        return Err("the line is empty".into());
    }
    if line.len() > 1024 {
        return Err(format!(
            "the line is {} characters long; at most 1024",
            line.len()
        ));
    }
    if let Some(c) = line.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "the line holds {}: one line of printable ASCII only (no newline, CR, tab, NUL or non-ASCII)",
            match c {
                '\n' => "a newline".to_string(),
                '\r' => "a carriage return".to_string(),
                '\0' => "a NUL".to_string(),
                c => format!("the character U+{:04X}", c as u32),
            }
        ));
    }
    let first = line.split_whitespace().next().unwrap_or_default();
    if SECTION_KEYWORDS.contains(&first.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "the line starts a new `{first}` section; extra lines belong to their own section"
        ));
    }
    // HAProxy's quoting: `\` escapes the next character; `'…'` quotes literally; `"…"`
    // expands `$VAR` and `${VAR}`.
    let (mut in_double, mut in_single, mut escaped) = (false, false, false);
    for c in line.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if !in_single => escaped = true,
            '"' if !in_single => in_double = !in_double,
            '\'' if !in_double => in_single = !in_single,
            '$' if in_double => {
                return Err(
                    "the line expands an environment variable (`$` inside double quotes)".into(),
                );
            }
            _ => {}
        }
    }
    if in_double || in_single || escaped {
        return Err("the line ends inside a quote or after a backslash".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(is_identifier("agent-7"));
        assert!(is_identifier("shop.v2_x"));
        assert!(!is_identifier("-x"));
        assert!(!is_identifier("a b"));
        assert!(!is_identifier("a:b"));
        assert!(!is_identifier(&"a".repeat(64)));
    }

    #[test]
    fn hosts() {
        assert!(check_host("shop.apps.example.com").is_ok());
        assert!(check_host("*.preview.example.com").is_ok());
        assert!(check_host("*.localhost").is_ok());
        assert!(check_host("localhost").is_ok());
        assert!(check_host("xn--bcher-kva.example.com").is_ok());
        for bad in [
            "Shop.example.com",
            "shop.example.com.",
            "a..b",
            "*.com",
            "*",
            "a.*.com",
            "sh*p.example.com",
            "-a.example.com",
            "1.2.3.4",
            "shop example.com",
            "shop.аpps.example.com",
            "xn--zz.example.com",
        ] {
            assert!(check_host(bad).is_err(), "{bad} should be rejected");
        }
        let long = format!("{}.example.com", "a".repeat(64));
        assert!(check_host(&long).unwrap_err().message.contains("63"));
        let err = check_host("bücher.example.com").unwrap_err();
        assert!(
            err.hint.contains("xn--bcher-kva.example.com"),
            "{}",
            err.hint
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_matches(
            "*.preview.example.com",
            "a.preview.example.com"
        ));
        assert!(!wildcard_matches(
            "*.preview.example.com",
            "a.b.preview.example.com"
        ));
        assert!(!wildcard_matches(
            "*.preview.example.com",
            "preview.example.com"
        ));
    }

    #[test]
    fn binds() {
        assert_eq!(
            parse_bind("127.0.0.1:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_bind(":80").unwrap().to_string(), ":80");
        assert_eq!(parse_bind("*:80").unwrap().to_string(), ":80");
        assert_eq!(parse_bind("[::1]:443").unwrap().to_string(), "ipv6@::1:443");
        assert!(parse_bind("::1:443").is_err());
        assert!(parse_bind("localhost:80").is_err());
        assert!(parse_bind("127.0.0.1:0").is_err());
        assert!(parse_bind("127.0.0.1:70000").is_err());
        let any = parse_bind(":80").unwrap();
        assert!(any.conflicts_with(&parse_bind("127.0.0.1:80").unwrap()));
        assert!(
            !parse_bind("127.0.0.1:80")
                .unwrap()
                .conflicts_with(&parse_bind("127.0.0.2:80").unwrap())
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap().ms, 10_000);
        assert_eq!(parse_duration("10000ms").unwrap().to_string(), "10s");
        assert_eq!(parse_duration("90s").unwrap().to_string(), "90s");
        assert_eq!(parse_duration("1500ms").unwrap().to_string(), "1500ms");
        for bad in ["10", "s", "0s", "1.5s", "10 s", "-1s", "1y"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_and_tokens() {
        assert!(is_safe_path("certs/"));
        assert!(is_safe_path("/etc/haproxy/haproxy.cfg"));
        assert!(!is_safe_path("certs dir"));
        assert!(!is_safe_path("${HOME}"));
        assert!(is_http_path("/healthz?full=1"));
        assert!(!is_http_path("/a b"));
        assert!(!is_http_path("/%[src]"));
        assert!(!is_config_token("a#b"));
        assert!(!is_config_token("a\"b"));
        assert!(is_config_token("agent:agent-7/shop"));
    }

    #[test]
    fn raw_lines_are_one_line_that_opens_no_section_and_expands_nothing() {
        for good in [
            "http-request deny if { path_beg /admin }",
            "http-response set-header Strict-Transport-Security \"max-age=63072000\"",
            "acl api path_reg ^/api/v[0-9]+$",
            "option httpchk",
            "timeout server 5m",
            "http-request return status 200 content-type text/plain string 'ok $HOME'",
            "http-request set-header X-Dollar \"a\\$b\"",
        ] {
            assert_eq!(check_raw_line(good), Ok(()), "{good:?}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("option httplog\nbackend evil", "a newline"),
            ("option httplog\r", "carriage return"),
            ("option\0httplog", "a NUL"),
            ("option\thttplog", "U+0009"),
            (
                "http-request deny if { hdr(host) -m str sh\u{00f6}p }",
                "U+00F6",
            ),
            ("backend stolen", "new `backend` section"),
            ("  Frontend other", "new `Frontend` section"),
            ("global", "new `global` section"),
            (
                "http-response set-header X-Token \"${LUNAFRONT_ADMIN_TOKEN}\"",
                "environment variable",
            ),
            (
                "http-response set-header X-Home \"$HOME\"",
                "environment variable",
            ),
            ("http-request set-header X \"unterminated", "inside a quote"),
            ("http-request set-header X trailing\\", "after a backslash"),
        ] {
            let e = check_raw_line(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(
            check_raw_line(&"x".repeat(1025))
                .unwrap_err()
                .contains("1024")
        );
    }
}
