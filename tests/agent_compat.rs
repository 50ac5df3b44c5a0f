//! The unchanged CloudLunacy deployment agent against lunafront, call for call: its installer
//! (`scripts/install-agent.sh`: register, authenticate, fetch config and certificates — made by
//! curl itself), its deployer (`modules/zeroDowntimeDeployer.js`: `POST /api/proxy/http` with
//! `useTls: true` and `targetUrl: "http://…"`, then `GET /api/proxy/routes` to verify, a
//! redeploy to a new port while the old container still serves, then the old one removed), its
//! MongoDB service (`src/services/mongodbService.js`: its public address from an IP-echo
//! service), its start-up authentication and its database manager — the axios requests byte for
//! byte as the JavaScript builds them. Traffic goes through a real HAProxy; MongoDB clients
//! are pymongo, the official driver.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;
use support::agent::*;
use support::*;

/// A CloudLunacy server id (a MongoDB ObjectId) and what the installer computes.
const SERVER_ID: &str = "65f0c1d2e3a4b5c6d7e8f901";
/// `hostname -I | awk '{print $1}'` on a VPS behind NAT: its private address.
const LOCAL_IP: &str = "10.0.0.5";
/// What the agent's IP-echo service answers: its public address.
const PUBLIC_IP: &str = "93.184.216.34";
const DAY: u64 = 86_400;

/// `curl -s -X POST "${FRONT_API_URL}/api/agents/register" -H "Content-Type: application/json"
/// -d "{ …multi-line… }"`, with the installer's own JSON text.
fn installer_register(api: u16, agent_token: &str, agent_name: &str) -> Answer {
    let body = format!(
        "{{\n      \"agentId\": \"{SERVER_ID}\",\n      \"agentKey\": \"{agent_token}\",\n      \"agentName\": \"{agent_name}\",\n      \"targetIp\": \"{LOCAL_IP}\"\n    }}"
    );
    curl(&[
        "-X",
        "POST",
        &format!("http://127.0.0.1:{api}/api/agents/register"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
    ])
}

/// The deployer's `registerWithFrontServer(serviceName, targetUrl)`: the body as axios sends
/// `JSON.stringify({agentId, subdomain, targetUrl, expectedDomain, options: {useTls: true,
/// check: true}})`.
fn deployer_register(api: u16, jwt: &str, service: &str, target_url: &str) -> Answer {
    axios_post(
        api,
        "/api/proxy/http",
        jwt,
        &format!(
            "{{\"agentId\":\"{SERVER_ID}\",\"subdomain\":\"{service}\",\"targetUrl\":\"{target_url}\",\"expectedDomain\":\"{service}.apps.example.com\",\"options\":{{\"useTls\":true,\"check\":true}}}}"
        ),
    )
}

/// The deployer's checks after a registration: `routes.some(r => r.subdomain === base)` and
/// `JSON.stringify(routes).includes(serviceName)`.
fn deployer_verifies(api: u16, jwt: &str, base: &str, service: &str) {
    let answer = axios_get(api, "/api/proxy/routes", jwt);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let routes = answer.json();
    assert!(
        routes["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["subdomain"] == base),
        "{routes}"
    );
    assert!(answer.body.contains(service), "{}", answer.body);
}

#[test]
fn the_unchanged_agent_installs_deploys_redeploys_and_registers_mongodb_for_more_than_a_year() {
    // The platform's agents live on loopback here: the administrator allows that network.
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
    );
    // The operator enrolls the server; the installer gets the token as AGENT_TOKEN.
    let agent_token = front.enroll(SERVER_ID);

    // -- install-agent.sh: register_agent. It sends `hostname -I` (private, not allowed): the
    // address its request came from is recorded instead.
    let registered = installer_register(front.api, &agent_token, "vps-1");
    assert_eq!(registered.status, 201, "{}", registered.body);
    assert!(
        registered.body.contains("token"),
        "the installer greps for `token`"
    );
    let saved = registered.json(); // saved as /opt/cloudlunacy/.agent_jwt.json
    assert_eq!(saved["success"], true);
    assert_eq!(saved["targetIp"], "127.0.0.1", "{saved}");
    let jwt = saved["token"].as_str().unwrap().to_string(); // AGENT_JWT, for ever after

    // -- fetch_certificates: authenticate (its branch when no JWT is at hand), then config.
    let auth = curl(&[
        "-X",
        "POST",
        &format!("http://127.0.0.1:{}/api/agents/authenticate", front.api),
        "-H",
        "Content-Type: application/json",
        "-d",
        &format!("{{\"agentId\":\"{SERVER_ID}\",\"agentKey\":\"{agent_token}\"}}"),
    ]);
    assert_eq!(auth.status, 200, "{}", auth.body);
    assert!(
        auth.json()["token"]
            .as_str()
            .is_some_and(|t| !t.is_empty() && t != "null")
    );
    let config = curl(&[
        "-H",
        &format!("Authorization: Bearer {jwt}"),
        &format!("http://127.0.0.1:{}/api/config/{SERVER_ID}", front.api),
    ]);
    assert_eq!(config.status, 200, "{}", config.body);
    let config = config.json();
    assert_eq!(config["success"], true);
    let (ca, server_cert, server_key) = (
        config["certificates"]["caCert"]
            .as_str()
            .unwrap()
            .to_string(),
        config["certificates"]["serverCert"]
            .as_str()
            .unwrap()
            .to_string(),
        config["certificates"]["serverKey"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    // The installer's own checks on what it saves.
    assert!(ca.contains("BEGIN CERTIFICATE") && ca.contains("END CERTIFICATE"));
    assert!(server_cert.contains("BEGIN CERTIFICATE") && server_cert.contains("END CERTIFICATE"));
    assert!(server_key.contains("BEGIN PRIVATE KEY") && server_key.contains("END PRIVATE KEY"));

    // -- The agent starts: authenticationService posts {agentToken, serverId} to its backend,
    // which is the front's URL when BACKEND_URL is unset. It is answered, not a 404.
    let started = axios_post(
        front.api,
        "/api/agent/authenticate",
        "",
        &format!("{{\"agentToken\":\"{agent_token}\",\"serverId\":\"{SERVER_ID}\"}}"),
    );
    assert_eq!(started.status, 200, "{}", started.body);
    assert_eq!(started.json()["success"], true);
    assert!(
        started.json().get("jwt").is_none(),
        "the agent keeps its own token"
    );

    // -- Deploy: the route is registered before the container is built, then again when
    // traffic is switched to it. useTls: true towards a plain-HTTP app must serve.
    let mut v1 = App::start("shop-v1");
    for _ in 0..2 {
        let answer = deployer_register(
            front.api,
            &jwt,
            "shop",
            &format!("http://{LOCAL_IP}:{}", v1.port),
        );
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.json()["success"], true);
        assert_eq!(answer.json()["domain"], "shop.apps.example.com");
        deployer_verifies(front.api, &jwt, "shop", "shop");
    }
    let (status, body) = http_get(front.http, "shop.apps.example.com", "/").unwrap();
    assert_eq!(
        status, 200,
        "useTls: true must not make HAProxy speak TLS to an http:// app: {body}"
    );
    assert!(body.starts_with("backend=shop-v1 "), "{body}");

    // -- Redeploy to a new port under keep-alive load: the new container is up, the route
    // moves, the old container is removed. No failed request, no reload.
    let before = front.generation();
    let load = Load::start(front.http, "shop.apps.example.com", 4);
    load.wait_for(200, Duration::from_secs(20));
    let v2 = App::start("shop-v2");
    let answer = deployer_register(
        front.api,
        &jwt,
        "shop",
        &format!("http://{LOCAL_IP}:{}", v2.port),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    deployer_verifies(front.api, &jwt, "shop", "shop");
    load.wait_for(200, Duration::from_secs(20));
    v1.remove();
    load.wait_for(500, Duration::from_secs(30));
    let last = load.last.lock().unwrap().clone();
    let (ok, failed, errors) = load.stop();
    assert_eq!(
        failed,
        0,
        "{failed} failed requests of {}: {errors:?}",
        ok + failed
    );
    assert!(
        last.iter().all(|b| b.starts_with("backend=shop-v2 ")),
        "{last:?}"
    );
    assert_eq!(
        front.generation(),
        before,
        "the redeploy reloaded HAProxy: {}",
        front.daemon.log_text()
    );

    // -- MongoDB: mongod presents the certificate the installer fetched; the agent registers
    // with its public address (from an IP-echo service), the front routes to the address it
    // reaches the agent at. pymongo connects by name, through HAProxy, verifying the CA.
    let mongod = mongod_stand_in("mongod-vps-1", &server_cert, &server_key);
    let answer = axios_post(
        front.api,
        "/api/mongodb/register",
        &jwt,
        &format!(
            "{{\"agentId\":\"{SERVER_ID}\",\"targetIp\":\"{PUBLIC_IP}\",\"targetPort\":{},\"useTls\":true}}",
            mongod.port
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let mongo = answer.json();
    assert_eq!(mongo["domain"], format!("{SERVER_ID}.mongodb.example.com"));
    assert_eq!(mongo["tlsEnabled"], true);
    let ca_file = front.site.path().join("ca.crt");
    std::fs::write(&ca_file, &ca).unwrap();
    let uri = mongo["connectionString"].as_str().unwrap().to_string();
    assert_eq!(
        uri,
        format!(
            "mongodb://{SERVER_ID}.mongodb.example.com:{}/?tls=true",
            front.tcp
        )
    );
    let whoami = pymongo_whoami(&uri, &ca_file, ".mongodb.example.com").unwrap();
    assert_eq!(whoami["standIn"], "mongod-vps-1", "{whoami}");
    assert_eq!(
        whoami["sni"],
        format!("{SERVER_ID}.mongodb.example.com"),
        "{whoami}"
    );
    // The database manager's call for MongoDB is the same route; Redis cannot be routed by
    // name: a 4xx the agent logs, not a 404.
    let answer = axios_post(
        front.api,
        "/api/proxy/mongodb",
        &jwt,
        &format!(
            "{{\"agentId\":\"{SERVER_ID}\",\"targetHost\":\"{PUBLIC_IP}\",\"targetPort\":{},\"options\":{{\"useTls\":true}}}}",
            mongod.port
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["useTls"], true);
    let answer = axios_post(
        front.api,
        "/api/proxy/redis",
        &jwt,
        &format!(
            "{{\"agentId\":\"{SERVER_ID}\",\"targetHost\":\"{PUBLIC_IP}\",\"targetPort\":6379,\"options\":{{\"useTls\":true}}}}"
        ),
    );
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("MongoDB")
    );

    // -- Two days later (a token of the old 24 h rule is dead): the agent deploys again with
    // the token it stored at install.
    front.set_clock(2 * DAY);
    let blog = App::start("blog");
    let answer = deployer_register(
        front.api,
        &jwt,
        "blog",
        &format!("http://{LOCAL_IP}:{}", blog.port),
    );
    assert_eq!(answer.status, 200, "day 2: {}", answer.body);
    deployer_verifies(front.api, &jwt, "blog", "blog");
    assert!(
        http_get(front.http, "blog.apps.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=blog ")
    );
    // Day 401: past the first 400 days, alive because it was used on day 2 (each use keeps
    // it valid for another 400 days).
    front.set_clock(401 * DAY);
    let answer = axios_get(front.api, "/api/proxy/routes", &jwt);
    assert_eq!(answer.status, 200, "day 401: {}", answer.body);
    // mongod's certificate from the installer still verifies (825 days), through HAProxy.
    let at = |days: u64| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + days * DAY
    };
    let mut conn = LongLived::open(
        client_config_at(&ca, at(800)),
        front.tcp,
        &format!("{SERVER_ID}.mongodb.example.com"),
    )
    .unwrap();
    conn.handshake()
        .expect("the agent's certificate is valid at day 800");
    // Unused for more than 400 days, the token is dead.
    front.set_clock(802 * DAY);
    let answer = axios_get(front.api, "/api/proxy/routes", &jwt);
    assert_eq!(answer.status, 401, "day 802: {}", answer.body);
    assert!(mongod.connections.load(Ordering::Relaxed) >= 1);

    // Day 802, 23 days before mongod's certificate ends (the daemon warns): what the agent
    // must do is the installer's certificate step again — authenticate with its key, fetch
    // its config — which hands out a new certificate.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !front.daemon.log_text().contains("must fetch a new one") {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning about the certificate's end: {}",
            front.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let auth = curl(&[
        "-X",
        "POST",
        &format!("http://127.0.0.1:{}/api/agents/authenticate", front.api),
        "-H",
        "Content-Type: application/json",
        "-d",
        &format!("{{\"agentId\":\"{SERVER_ID}\",\"agentKey\":\"{agent_token}\"}}"),
    ]);
    assert_eq!(auth.status, 200, "{}", auth.body);
    let jwt = auth.json()["token"].as_str().unwrap().to_string();
    let config = curl(&[
        "-H",
        &format!("Authorization: Bearer {jwt}"),
        &format!("http://127.0.0.1:{}/api/config/{SERVER_ID}", front.api),
    ])
    .json();
    let renewed = config["certificates"]["serverCert"].as_str().unwrap();
    assert_ne!(renewed, server_cert, "not renewed at day 802");
    let renewed_mongod = mongod_stand_in(
        "mongod-renewed",
        renewed,
        config["certificates"]["serverKey"].as_str().unwrap(),
    );
    let answer = axios_post(
        front.api,
        "/api/mongodb/register",
        &jwt,
        &format!(
            "{{\"agentId\":\"{SERVER_ID}\",\"targetIp\":\"{PUBLIC_IP}\",\"targetPort\":{},\"useTls\":true}}",
            renewed_mongod.port
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let mut conn = LongLived::open(
        client_config_at(&ca, at(1600)),
        front.tcp,
        &format!("{SERVER_ID}.mongodb.example.com"),
    )
    .unwrap();
    conn.handshake()
        .expect("the renewed certificate is valid at day 1600");
}

#[test]
fn the_target_url_scheme_decides_tls_to_the_app_and_service_names_map_to_labels() {
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
    );
    let jwt = front.register(SERVER_ID, "127.0.0.1");
    // An https:// app: HAProxy speaks TLS to it, whatever useTls says.
    let leaf = TestCa::new().leaf(&["localhost"]);
    let secure = https_app("secure", &leaf);
    let answer = axios_post(
        front.api,
        "/api/proxy/http",
        &jwt,
        &format!(
            "{{\"agentId\":\"{SERVER_ID}\",\"subdomain\":\"secure\",\"targetUrl\":\"https://{LOCAL_IP}:{}\",\"options\":{{\"useTls\":false,\"check\":false}}}}",
            secure.port
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let (status, body) = http_get(front.http, "secure.apps.example.com", "/").unwrap();
    assert_eq!((status, body.as_str()), (200, "backend=secure tls=yes\n"));

    // Names the original front accepted: uppercase, `_`, `.` map to a label, returned in
    // `domain`; the routes list keeps the name the agent asked for.
    let app = App::start("app");
    let answer = deployer_register(
        front.api,
        &jwt,
        "My_Shop.v2",
        &format!("http://{LOCAL_IP}:{}", app.port),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["domain"], "my-shop-v2.apps.example.com");
    let routes = axios_get(front.api, "/api/proxy/routes", &jwt);
    assert!(
        routes.body.contains("\"serviceName\":\"My_Shop.v2\""),
        "{}",
        routes.body
    );
    assert!(
        routes.body.contains("\"subdomain\":\"my-shop-v2\""),
        "{}",
        routes.body
    );
    assert!(
        http_get(front.http, "my-shop-v2.apps.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=app ")
    );
    // The same name again (a redeploy) is fine; another name mapping to the same label is a
    // conflict, not a silent replacement.
    let again = deployer_register(
        front.api,
        &jwt,
        "my_shop.V2",
        &format!("http://{LOCAL_IP}:{}", app.port),
    );
    assert_eq!(again.status, 200, "{}", again.body);
    let clash = deployer_register(
        front.api,
        &jwt,
        "my-shop_v2",
        &format!("http://{LOCAL_IP}:{}", app.port),
    );
    assert_eq!(clash.status, 409, "{}", clash.body);
    // A name that maps to no label: 400 naming the field and the rule.
    let bad = deployer_register(
        front.api,
        &jwt,
        "shop_",
        &format!("http://{LOCAL_IP}:{}", app.port),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.json()["fields"]["subdomain"]
            .as_str()
            .unwrap()
            .contains("maps to `shop-`"),
        "{}",
        bad.body
    );
}

#[test]
fn the_front_renews_the_mongodb_certificate_it_presents_without_the_agent() {
    let front = ApiFront::start_with(
        "terminate, certificates: certs",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
        &[(
            "state/certs/default.pem",
            TestCa::new().leaf(&["default.example.com"]).combined(),
        )],
    );
    let jwt = front.register("agent-1", "127.0.0.1");
    let mongod = tcp_backend("mongod");
    let answer = axios_post(
        front.api,
        "/api/mongodb/register",
        &jwt,
        &format!(
            "{{\"agentId\":\"agent-1\",\"targetIp\":\"127.0.0.1\",\"targetPort\":{},\"useTls\":false}}",
            mongod.port
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let (_, ca) = http_json(front.api, "GET", "/api/certificates/mongodb-ca", None, None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exchange = |days: u64| {
        tls_exchange_with(
            client_config_at(&ca, now + days * DAY),
            front.tcp,
            "agent-1.mongodb.example.com",
            "hello",
        )
    };
    assert_eq!(exchange(1).unwrap(), "tcp-backend=mongod got=hello");
    assert!(exchange(95).is_err(), "the first certificate lasts 90 days");
    // 70 days on, the agent has called nothing: the front renews what it presents.
    front.set_clock(70 * DAY);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match exchange(95) {
            Ok(reply) => {
                assert_eq!(reply, "tcp-backend=mongod got=hello");
                break;
            }
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "not renewed: {e}\n{}",
                front.daemon.log_text()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
