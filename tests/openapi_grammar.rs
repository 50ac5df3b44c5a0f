//! `api/openapi.yaml` states the rule of every field (patterns, lengths, formats); the server
//! checks fields with its own functions (`names::is_identifier`, `ops::label_of`,
//! `ops::parse_target_url`, `ops::parse_ip`, `api::Fields`). Clients, and a fuzzer such as
//! Schemathesis, rely on the document: a value it allows that the server refuses (or the other
//! way round) is a bug. Each rule here is taken from the document as written, run through a JSON
//! Schema validator, and compared with the server's function on generated values — boundary
//! lengths, every character class, structured near-misses — which must each be accepted by both
//! or refused by both.

use lunafront::api::Fields;
use lunafront::api::ops;
use lunafront::model::names;
use serde_json::{Value, json};

/// The document's component schema `name`, as a validator (formats checked).
fn rule(spec: &Value, name: &str) -> jsonschema::Validator {
    let wrapped = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": spec["components"],
    });
    jsonschema::options()
        .should_validate_formats(true)
        .build(&wrapped)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn spec() -> Value {
    serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml")).unwrap(),
    )
    .unwrap()
}

/// A small deterministic generator (xorshift): the same values on every run.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    /// A string of fewer than `max` characters drawn from `pool`.
    fn upto(&mut self, pool: &[char], max: usize) -> String {
        let len = self.below(max);
        self.string(pool, len)
    }
    /// A string of `len` characters drawn from `pool`.
    fn string(&mut self, pool: &[char], len: usize) -> String {
        (0..len).map(|_| *self.pick(pool)).collect()
    }
}

const LETTERS: &str = "abcxyzABCXYZ0123456789";
const PUNCT: &str = "._-+:/?#[]@!$%&'()*,;=~\"\\^`{|}<> ";
const ODD: &[char] = &[
    '\n', '\r', '\t', '\0', '\u{7f}', '\u{85}', 'é', 'а', 'ß', '\u{200b}', '😀', 'İ', 'K',
];

/// Characters of every class: what a rule allows, its near-misses, and hostile ones.
fn pool(extra: &str) -> Vec<char> {
    let mut p: Vec<char> = LETTERS.chars().chain(extra.chars()).collect();
    // Weighted towards the allowed characters, so long valid values come up too.
    p.extend(LETTERS.chars());
    p.extend(PUNCT.chars());
    p.extend(ODD);
    p
}

/// Compares the document's `schema` with the server's `accepts` on `values`; returns how many
/// were accepted and refused (each must come up, or the comparison proves little).
fn compare(
    name: &str,
    schema: &jsonschema::Validator,
    accepts: impl Fn(&Value) -> bool,
    values: impl IntoIterator<Item = Value>,
) -> (usize, usize) {
    let (mut yes, mut no) = (0, 0);
    let mut disagreements = Vec::new();
    for value in values {
        let document = schema.is_valid(&value);
        let server = accepts(&value);
        if document != server {
            disagreements.push(format!(
                "{value}: the document {} it, the server {} it",
                if document { "allows" } else { "refuses" },
                if server { "accepts" } else { "refuses" }
            ));
        }
        if server { yes += 1 } else { no += 1 }
    }
    assert!(
        disagreements.is_empty(),
        "{name}: the document and the server disagree on {} values:\n{}",
        disagreements.len(),
        disagreements[..disagreements.len().min(20)].join("\n")
    );
    assert!(
        yes >= 20 && no >= 20,
        "{name}: {yes} accepted and {no} refused values prove little"
    );
    (yes, no)
}

/// Reads `value` as the field `name` of a body the way a handler does.
fn field(value: &Value, read: impl FnOnce(&mut Fields) -> Option<()>) -> bool {
    let body = json!({ "f": value });
    let mut f = Fields::new(&body);
    let ok = read(&mut f).is_some();
    ok && f.errors.is_empty()
}

/// Random strings over `pool`, with lengths around `bounds`, plus every string of up to two
/// characters over a smaller alphabet.
fn strings(seed: u64, pool: &[char], bounds: &[usize], count: usize) -> Vec<Value> {
    let mut g = Gen(seed);
    let mut out = Vec::new();
    let small: Vec<char> = "a0._-+:/ \n".chars().collect();
    out.push(json!(""));
    for a in &small {
        out.push(json!(a.to_string()));
        for b in &small {
            out.push(json!(format!("{a}{b}")));
        }
    }
    // Names of exactly the boundary lengths, over the characters names allow.
    let name: Vec<char> = "abcXYZ019._-".chars().collect();
    for bound in bounds {
        for len in bound.saturating_sub(1)..=bound + 1 {
            for _ in 0..10 {
                let mut s = g.string(&name, len);
                if g.below(2) == 0 && !s.is_empty() {
                    s.replace_range(0..1, "a");
                }
                out.push(json!(s));
            }
        }
    }
    for _ in 0..count {
        let around = *g.pick(bounds);
        let len = (around + g.below(5)).saturating_sub(2);
        out.push(json!(g.string(pool, len)));
    }
    out
}

#[test]
fn agent_ids_follow_the_identifier_grammar() {
    let spec = spec();
    let schema = rule(&spec, "AgentId");
    let mut values = strings(1, &pool(""), &[1, 2, 10, 62, 63, 64, 65], 3000);
    values.extend([json!(1), json!(null), json!(["a"]), json!("a".repeat(63))]);
    compare(
        "AgentId",
        &schema,
        |v| {
            field(v, |f| {
                Some(f.agent_id("f")).filter(|s| !s.is_empty()).map(|_| ())
            })
        },
        values.clone(),
    );
    // The rule every name of the state follows, and the store's own check.
    compare(
        "AgentId (names::is_identifier)",
        &schema,
        |v| v.as_str().is_some_and(names::is_identifier),
        values,
    );
}

#[test]
fn agent_keys_are_16_to_512_printable_characters() {
    let spec = spec();
    let schema = rule(&spec, "AgentKey");
    let mut values = strings(2, &pool(""), &[1, 15, 16, 17, 100, 511, 512, 513], 2000);
    values.extend([json!(12345678901234567u64), json!(null)]);
    compare(
        "AgentKey",
        &schema,
        |v| v.as_str().is_some_and(ops::is_agent_key),
        values,
    );
}

#[test]
fn texts_are_1_to_4096_characters_counted_as_characters() {
    let spec = spec();
    for name in ["Text", "Secret"] {
        let schema = rule(&spec, name);
        let mut values = strings(3, &pool(""), &[0, 1, 2, 4095, 4096, 4097], 300);
        // Multi-byte characters: 4096 of them are more than 4096 bytes.
        values.extend([
            json!("é".repeat(4096)),
            json!("é".repeat(4097)),
            json!("😀".repeat(4096)),
            json!(5),
            json!(true),
            json!({}),
        ]);
        compare(
            name,
            &schema,
            |v| field(v, |f| f.optional_text("f").map(|_| ())),
            values,
        );
    }
}

#[test]
fn service_names_are_what_maps_to_a_dns_label() {
    let spec = spec();
    let schema = rule(&spec, "ServiceName");
    let mut values = strings(4, &pool(""), &[1, 2, 5, 62, 63, 64], 4000);
    let mut g = Gen(44);
    for _ in 0..500 {
        // Near-misses: the `xn--` prefix in its mapped spellings, names ending in a separator.
        let prefix = g.pick(&["xn--", "XN__", "xN.-", "xn-", "x--", "ab--", "xn_-", ""]);
        let body = g.upto(&pool(""), 8);
        let end = g.pick(&["", "_", ".", "-", "a", "9"]);
        values.push(json!(format!("{prefix}{body}{end}")));
    }
    values.extend([json!("My_Shop.v2"), json!("shop_"), json!(7)]);
    compare(
        "ServiceName",
        &schema,
        |v| {
            field(v, |f| {
                let s = f.text("f");
                ops::label_of(&s).ok().map(|_| ())
            })
        },
        values,
    );
}

#[test]
fn target_urls_follow_the_documented_grammar() {
    let spec = spec();
    let schema = rule(&spec, "TargetUrl");
    let mut g = Gen(5);
    let mut values = strings(55, &pool(""), &[5, 12, 20, 40], 500);
    for _ in 0..5000 {
        let scheme = g.pick(&["http://", "https://", "ftp://", "HTTP://", "http:/", ""]);
        let host = match g.below(4) {
            0 => g
                .pick(&[
                    "127.0.0.1",
                    "10.0.0.5",
                    "app.internal",
                    "a_b-c",
                    "[::1]",
                    "x",
                ])
                .to_string(),
            _ => g.upto(&pool(""), 6),
        };
        let port = match g.below(3) {
            0 => String::new(),
            _ => format!(
                ":{}",
                g.pick(&[
                    "1", "80", "080", "0", "65535", "65536", "99999", "", "3000", "+1", "1a",
                    "6553", "65529", "100000"
                ])
            ),
        };
        let tail = match g.below(3) {
            0 => String::new(),
            _ => format!("{}{}", g.pick(&["/", "?", "#", ""]), g.upto(&pool(""), 10)),
        };
        values.push(json!(format!("{scheme}{host}{port}{tail}")));
    }
    values.push(json!(format!("http://x/{}", "a".repeat(4096 - 9))));
    values.push(json!(format!("http://x/{}", "a".repeat(4097 - 9))));
    compare(
        "TargetUrl",
        &schema,
        |v| {
            field(v, |f| {
                let s = f.text("f");
                ops::parse_target_url(&s).ok().map(|_| ())
            })
        },
        values,
    );
}

#[test]
fn ip_addresses_are_what_the_server_parses() {
    let spec = spec();
    let schema = rule(&spec, "IpAddress");
    let mut g = Gen(6);
    let mut values = strings(66, &pool(""), &[3, 7, 15, 39], 300);
    for _ in 0..3000 {
        let text = match g.below(4) {
            0 => {
                let parts: Vec<String> = (0..4)
                    .map(|_| {
                        g.pick(&["0", "1", "01", "255", "256", "10", "192", "00", "-1", "a"])
                            .to_string()
                    })
                    .collect();
                parts.join(".")
            }
            1 => std::net::Ipv6Addr::from(
                (g.next() as u128) << 64 | g.next() as u128 & if g.below(2) == 0 { 0 } else { !0 },
            )
            .to_string(),
            2 => format!(
                "{}{}{}",
                g.pick(&["", " ", "[", "::ffff:", "64:ff9b::", "fe80::1%", "::"]),
                g.pick(&[
                    "127.0.0.1",
                    "::1",
                    "2001:db8::5",
                    "10.0.0.1",
                    "eth0",
                    "1:2:3:4:5:6:7:8",
                    "1:2:3:4:5:6:7:8:9"
                ]),
                g.pick(&["", " ", "]", "\n", "/24", ":80"])
            ),
            _ => g.upto(&"0123456789abcdef:.".chars().collect::<Vec<_>>(), 20),
        };
        values.push(json!(text));
    }
    values.extend([json!(127001), json!(null)]);
    compare(
        "IpAddress",
        &schema,
        |v| {
            field(v, |f| {
                let s = f.text("f");
                ops::parse_ip(&s).ok().map(|_| ())
            })
        },
        values,
    );
}

#[test]
fn ports_are_numbers_or_digit_strings_from_1_to_65535() {
    let spec = spec();
    let schema = rule(&spec, "Port");
    let mut values: Vec<Value> = vec![
        json!(0),
        json!(1),
        json!(65535),
        json!(65536),
        json!(-1),
        json!(3000.0),
        json!(3000.5),
        json!(1e3),
        json!(1e10),
        json!(true),
        json!(null),
        json!([80]),
        json!({}),
    ];
    let mut g = Gen(7);
    for _ in 0..2000 {
        let digits = g.upto(&"0123456789".chars().collect::<Vec<_>>(), 8);
        let text = format!(
            "{}{}{}",
            g.pick(&["", "", "+", "-", " ", "0", "00"]),
            digits,
            g.pick(&["", "", "", " ", ".0", "a", "\n"])
        );
        values.push(json!(text));
        if let Ok(n) = digits.parse::<i64>() {
            values.push(json!(n));
        }
    }
    compare(
        "Port",
        &schema,
        |v| {
            field(v, |f| {
                let p = f.port("f");
                (p > 0).then_some(())
            })
        },
        values,
    );
}

#[test]
fn flags_are_booleans_or_null() {
    let spec = spec();
    let schema = rule(&spec, "Flag");
    let mut values = vec![json!(true), json!(false), json!(null)];
    for v in [
        json!(0),
        json!(1),
        json!("true"),
        json!(""),
        json!([]),
        json!({}),
    ] {
        values.push(v);
    }
    let (yes, no) = {
        // Too few values for `compare`'s counts: compared one by one here.
        let mut counts = (0, 0);
        for v in &values {
            let server = field(v, |f| {
                f.flag(&["f"]);
                Some(())
            });
            assert_eq!(schema.is_valid(v), server, "{v}");
            if server { counts.0 += 1 } else { counts.1 += 1 }
        }
        counts
    };
    assert_eq!((yes, no), (3, 6));
    // A flag inside `options`: `options` must be an object (or null, or absent).
    let options = &spec["components"]["schemas"]["HttpRouteRequest"]["properties"]["options"];
    let validator = jsonschema::options()
        .build(&json!({"$ref": "#/o", "o": options, "components": spec["components"]}))
        .unwrap();
    for (v, ok) in [
        (json!({"useTls": true}), true),
        (json!(null), true),
        (json!({}), true),
        (json!(5), false),
        (json!([]), false),
        (json!({"useTls": "yes"}), false),
    ] {
        let body = json!({ "options": v });
        let mut f = Fields::new(&body);
        f.flag(&["options", "useTls"]);
        assert_eq!(f.errors.is_empty(), ok, "{v}");
        assert_eq!(validator.is_valid(&v), ok, "{v}");
    }
}

/// Every field of every request body names one of the rules above (or is an enum, const or
/// flag): a new field cannot come without its rule.
#[test]
fn every_request_field_has_a_rule() {
    let spec = spec();
    let schemas = &spec["components"]["schemas"];
    let known = [
        "AgentId",
        "AgentKey",
        "Secret",
        "Text",
        "IpAddress",
        "ServiceName",
        "TargetUrl",
        "Port",
        "Flag",
        "Csr",
    ];
    let mut checked = 0;
    for (name, schema) in schemas.as_object().unwrap() {
        if !name.ends_with("Request") && name != "NewRoute" {
            continue;
        }
        let mut fields = Vec::new();
        collect_properties(schema, &mut fields);
        for (field, rule) in fields {
            let ok = match rule.get("$ref").and_then(Value::as_str) {
                Some(r) => known
                    .iter()
                    .any(|k| r == format!("#/components/schemas/{k}")),
                None => {
                    rule.get("enum").is_some()
                        || rule.get("const").is_some()
                        || rule == &json!(false)
                        || rule == &json!({"type": "string"})
                        || rule.get("properties").is_some()
                }
            };
            assert!(ok, "{name}.{field} has no rule the tests compare: {rule}");
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} fields found");
}

fn collect_properties<'a>(schema: &'a Value, out: &mut Vec<(String, &'a Value)>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            out.push((k.clone(), v));
            collect_properties(v, out);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(items) = schema.get(key).and_then(Value::as_array) {
            for item in items {
                collect_properties(item, out);
            }
        }
    }
}

/// The request body schema of `method path`, and the schema of each of its path parameters,
/// as validators over the whole document (`$ref`s resolved).
fn request_rules(
    spec: &Value,
    path: &str,
    method: &str,
) -> (jsonschema::Validator, Vec<jsonschema::Validator>) {
    let build = |schema: &Value| {
        jsonschema::options()
            .should_validate_formats(true)
            .build(&json!({"allOf": [schema], "components": spec["components"]}))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };
    let item = &spec["paths"][path];
    let operation = &item[method];
    assert!(
        operation.is_object(),
        "{method} {path} is not in the document"
    );
    let body = operation
        .pointer("/requestBody/content/application~1json/schema")
        .cloned()
        .unwrap_or(json!(true));
    let mut params = Vec::new();
    for list in [&item["parameters"], &operation["parameters"]] {
        for p in list.as_array().into_iter().flatten() {
            let p = match p.get("$ref").and_then(Value::as_str) {
                Some(r) => spec.pointer(r.trim_start_matches('#')).unwrap(),
                None => p,
            };
            if p["in"] == "path" {
                params.push(build(&p["schema"]));
            }
        }
    }
    (build(&body), params)
}

/// Schemathesis 4.32.5's first run against the daemon (ST202, "schema-valid requests
/// rejected", 6 operations): the document allowed `subdomain: ""`, `targetUrl: ""`,
/// `targetIp: ""`, `address: ""`, a route `port: 1` with an empty subdomain, and ids of any
/// characters, which the server refuses (400). The document refuses each of them now.
#[test]
fn requests_the_server_refuses_for_empty_fields_or_odd_ids_are_refused_by_the_document() {
    let spec = spec();
    let url = "http://127.0.0.1:3000";
    let key = "0123456789abcdef";
    let bodies = [
        (
            "/api/proxy/http",
            json!({"agentId": "a", "subdomain": "", "targetUrl": url}),
        ),
        (
            "/api/proxy/http",
            json!({"agentId": "a", "subdomain": "shop", "targetUrl": ""}),
        ),
        (
            "/api/proxy/http",
            json!({"agentId": "a\u{15}", "subdomain": "shop", "targetUrl": url}),
        ),
        (
            "/api/agent/register",
            json!({"agentId": "a", "agentKey": key, "targetIp": ""}),
        ),
        (
            "/api/agents/register",
            json!({"agentId": "a b", "agentKey": key, "targetIp": "127.0.0.1"}),
        ),
        (
            "/api/mongodb/register",
            json!({"agentId": "a", "targetIp": "", "targetPort": 27017}),
        ),
        (
            "/api/proxy/{dbType}",
            json!({"agentId": "a", "targetHost": "", "targetPort": 27017}),
        ),
        ("/v1/agents", json!({"id": "a", "address": ""})),
        (
            "/v1/agents",
            json!({"id": "\u{15}\u{90}", "address": "127.0.0.1"}),
        ),
        (
            "/v1/agents/{id}/routes",
            json!({"port": 1, "subdomain": ""}),
        ),
    ];
    for (path, body) in bodies {
        let (rule, _) = request_rules(&spec, path, "post");
        assert!(
            !rule.is_valid(&body),
            "the document allows POST {path} {body}"
        );
        // The server's own check refuses it too (the request reaches no further).
        let mut f = Fields::new(&body);
        let refused = match path {
            "/api/proxy/http" => {
                let _ = f.agent_id("agentId");
                let s = f.text("subdomain");
                let u = f.text("targetUrl");
                !f.errors.is_empty()
                    || ops::label_of(&s).is_err()
                    || ops::parse_target_url(&u).is_err()
            }
            "/v1/agents" => {
                let _ = f.text("id");
                let id = body["id"].as_str().unwrap();
                let a = body["address"].as_str().unwrap();
                !names::is_identifier(id) || ops::parse_ip(a).is_err()
            }
            "/v1/agents/{id}/routes" => ops::label_of("").is_err(),
            _ => {
                let id = body["agentId"].as_str().unwrap();
                let ip = body
                    .get("targetIp")
                    .or(body.get("targetHost"))
                    .and_then(Value::as_str)
                    .unwrap();
                !names::is_identifier(id) || ops::parse_ip(ip).is_err()
            }
        };
        assert!(refused, "the server accepts POST {path} {body}");
    }
    let ids = ["\u{15}\u{90}", "a b", "a\nb", "-x", "é", "..", ""];
    let mut checked = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        if !path.contains("{id}") && !path.contains("{agentId}") {
            continue;
        }
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let (_, params) = request_rules(&spec, path, method);
            let id_rule = &params[0];
            for id in ids {
                assert!(
                    !id_rule.is_valid(&json!(id)) && !names::is_identifier(id),
                    "{method} {path} allows the id {id:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} operations with an id");
}
