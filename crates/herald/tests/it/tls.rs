//! TLS on the main listener: https and wss with a test CA trusted, certificate reloads (SIGHUP
//! to the real binary, file changes), refused reloads, bad certificates at start, the plain
//! health listener and `--dev-tls`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
    sync::mpsc,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

use crate::harness::{ADMIN_TOKEN, PATIENCE, TestServer, eventually};

/// A test CA that signs leaf certificates for 127.0.0.1 and localhost.
struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

/// One leaf: its PEM files' contents and its DER (what a client sees as the peer).
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Self { params, key, pem }
    }

    fn leaf(&self, name: &str) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// The certificate files a server is configured with, in a directory of their own.
struct CertFiles {
    dir: tempfile::TempDir,
}

impl CertFiles {
    fn new(leaf: &Leaf) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("dir"),
        };
        files.install(leaf);
        files
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Replaces both files, each by a rename (as cert-manager and `mv` do), key first: a
    /// reader never sees half a file.
    fn install(&self, leaf: &Leaf) {
        replace(&self.key(), leaf.key_pem.as_bytes());
        replace(&self.cert(), leaf.cert_pem.as_bytes());
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HERALD_TLS__CERT", self.cert().display().to_string()),
            ("HERALD_TLS__KEY", self.key().display().to_string()),
        ]
    }
}

fn replace(path: &Path, contents: &[u8]) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, contents).expect("write");
    std::fs::rename(&staged, path).expect("rename");
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts `ca` only and offers `alpn`.
fn client_config(ca: &TestCa, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            CertificateDer::from_pem_slice(ca.pem.as_bytes())
                .expect("CA PEM")
                .into_owned(),
        )
        .expect("add the CA");
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` (named 127.0.0.1) trusting `ca` alone.
async fn tls_connect(addr: &str, ca: &TestCa, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    TlsConnector::from(client_config(ca, alpn))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("TLS handshake")
}

/// The leaf certificate a new handshake with `addr` gets.
async fn served_certificate(addr: &str, ca: &TestCa) -> CertificateDer<'static> {
    let stream = tls_connect(addr, ca, &[]).await;
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates")[0]
        .clone()
}

/// reqwest trusting the test CA and nothing else.
fn https_client(ca: &TestCa) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).expect("CA")])
        .build()
        .expect("client")
}

/// `host:port` of a base URL.
fn authority(base: &str) -> String {
    url::Url::parse(base)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port()?)))
        .expect("a base URL with a port")
}

/// The Svix-shaped API over https.
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: &str, ca: &TestCa) -> Self {
        assert!(base.starts_with("https://"), "{base}");
        Self {
            base: base.to_owned(),
            http: https_client(ca),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("https request");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON")
        };
        (status, value)
    }

    /// A new app: its id, Pusher key and Pusher app id.
    async fn app(&self, uid: &str) -> (String, String, String) {
        let (status, app) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/app",
                Some(json!({"name": uid, "uid": uid})),
            )
            .await;
        assert_eq!(status, 201, "{app}");
        (
            app["id"].as_str().expect("id").to_owned(),
            app["pusher"]["key"].as_str().expect("key").to_owned(),
            app["pusher"]["appId"].as_str().expect("appId").to_owned(),
        )
    }

    /// Publishes `payload` as `event` on `channel` (Svix API, `channels`).
    async fn publish(&self, app: &str, channel: &str, event: &str, payload: Value) {
        let (status, msg) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/app/{app}/msg"),
                Some(json!({"eventType": event, "channels": [channel], "payload": payload})),
            )
            .await;
        assert_eq!(status, 201, "{msg}");
    }
}

/// A Pusher WebSocket over TLS, and the certificate its handshake got.
struct Wss {
    socket: WebSocketStream<TlsStream<TcpStream>>,
    peer: CertificateDer<'static>,
}

impl Wss {
    async fn connect(addr: &str, ca: &TestCa, key: &str) -> Self {
        let stream = tls_connect(addr, ca, &[b"http/1.1"]).await;
        let peer = stream.get_ref().1.peer_certificates().expect("peer")[0].clone();
        let url = format!("wss://{addr}/app/{key}?protocol=7&client=js&version=8.4.0");
        let (socket, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("WebSocket handshake over TLS");
        let mut wss = Self { socket, peer };
        let hello = wss.next().await;
        assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
        wss
    }

    async fn next(&mut self) -> Value {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return serde_json::from_str(text.as_str()).expect("JSON frame");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("expected a text frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("timed out waiting for a frame")
    }

    async fn subscribe(&mut self, channel: &str) {
        self.socket
            .send(Message::text(
                json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string(),
            ))
            .await
            .expect("send");
        let ok = self.next().await;
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
    }

    /// The next event (not a protocol frame) on the socket.
    async fn event(&mut self) -> Value {
        loop {
            let frame = self.next().await;
            if !frame["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("pusher"))
            {
                return frame;
            }
        }
    }
}

/// An in-process server with TLS from `files`, and its https base URL.
async fn tls_server(files: &CertFiles, watch_interval_ms: u64) -> (TestServer, String) {
    let (cert, key) = (files.cert(), files.key());
    let server = TestServer::start_with(move |config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.tls.watch_interval_ms = watch_interval_ms;
    })
    .await;
    let base = server.base.replacen("http://", "https://", 1);
    (server, base)
}

#[tokio::test]
async fn https_and_wss_serve_every_face_with_the_ca_trusted() {
    let ca = TestCa::new("Herald test CA");
    let leaf = ca.leaf("herald one");
    let files = CertFiles::new(&leaf);
    let (server, base) = tls_server(&files, 0).await;
    let addr = authority(&base);
    let api = Api::new(&base, &ca);

    let (status, _) = api.call(reqwest::Method::GET, "/health/live", None).await;
    assert_eq!(status, 204);
    let (app, key, pusher_id) = api.app("tls-faces").await;

    let mut socket = Wss::connect(&addr, &ca, &key).await;
    assert_eq!(socket.peer, leaf.der, "the configured leaf is served");
    socket.subscribe("orders").await;
    api.publish(&app, "orders", "order.paid", json!({"id": 1}))
        .await;
    assert_eq!(
        socket.event().await,
        json!({"event": "order.paid", "channel": "orders", "data": "{\"id\":1}"})
    );

    // SSE over https: the stream confirms, then carries the next event. It is served off
    // hyper, on the TLS stream (the head the listener writes says `connection: close`).
    let mut sse = https_client(&ca)
        .get(format!("{base}/apps/{pusher_id}/sse?channels=orders"))
        .send()
        .await
        .expect("SSE over https");
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["connection"], "close");
    let mut seen = String::new();
    let mut published = false;
    tokio::time::timeout(PATIENCE, async {
        while !seen.contains("sse.event") {
            let chunk = sse
                .chunk()
                .await
                .expect("SSE bytes")
                .expect("the stream ended");
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if !published && seen.contains("herald:subscription_succeeded") {
                published = true;
                api.publish(&app, "orders", "sse.event", json!({"id": 2}))
                    .await;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no SSE event over https: {seen}"));

    // ALPN: http/1.1 is chosen when offered beside h2; h2 alone is refused in the handshake.
    let offered = tls_connect(&addr, &ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(offered.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let h2_only = TlsConnector::from(client_config(&ca, &[b"h2"]))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await;
    assert!(h2_only.is_err(), "h2 alone is not spoken here");

    // Plain HTTP to the TLS port is not served.
    let plain = crate::harness::http_client()
        .get(format!("{}/health/live", server.base))
        .timeout(PATIENCE)
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // A client that does not trust the CA is refused by its own TLS check.
    let other = TestCa::new("another CA");
    let stranger = https_client(&other)
        .get(format!("{base}/health/live"))
        .send()
        .await;
    assert!(stranger.is_err(), "a client without the CA got through");
    server.stop().await;
}

#[tokio::test]
async fn a_tls_handshake_never_started_is_cut_at_the_header_timeout_and_frees_its_slot() {
    let ca = TestCa::new("Herald test CA");
    let files = CertFiles::new(&ca.leaf("slots"));
    let (cert, key) = (files.cert(), files.key());
    let server = TestServer::start_with(move |config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.listener.header_read_timeout_secs = 0.5;
        config.listener.max_connections_per_ip = 1;
    })
    .await;
    let base = server.base.replacen("http://", "https://", 1);
    let addr = authority(&base);
    // A socket that never says hello holds the address's one slot: another from the same
    // address is closed before any handshake...
    let mut silent = TcpStream::connect(&addr).await.expect("connect");
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let refused = TlsConnector::from(client_config(&ca, &[]))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await;
    assert!(
        refused.is_err(),
        "a second socket from the address got a handshake"
    );
    // ...until the handshake timeout closes it; then the slot is free again.
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("the silent socket was not closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let served = eventually("the slot to be free again", || async {
        let tcp = TcpStream::connect(&addr).await.ok()?;
        TlsConnector::from(client_config(&ca, &[]))
            .connect(ServerName::try_from("127.0.0.1").ok()?, tcp)
            .await
            .ok()
    })
    .await;
    assert!(served.get_ref().1.peer_certificates().is_some());
    server.stop().await;
}

#[tokio::test]
async fn a_changed_certificate_file_is_picked_up_by_the_watcher() {
    let ca = TestCa::new("Herald test CA");
    let (first, second) = (ca.leaf("first"), ca.leaf("second"));
    let files = CertFiles::new(&first);
    let (server, base) = tls_server(&files, 50).await;
    let addr = authority(&base);
    assert_eq!(served_certificate(&addr, &ca).await, first.der);
    let api = Api::new(&base, &ca);
    let (app, key, _) = api.app("tls-watch").await;
    let mut open = Wss::connect(&addr, &ca, &key).await;
    open.subscribe("orders").await;

    files.install(&second);
    eventually("new handshakes to get the new certificate", || async {
        (served_certificate(&addr, &ca).await == second.der).then_some(())
    })
    .await;
    // The socket opened before keeps its session, and its events.
    api.publish(&app, "orders", "after.swap", json!({"n": 2}))
        .await;
    assert_eq!(open.event().await["event"], "after.swap");
    assert_eq!(open.peer, first.der);
    server.stop().await;
}

/// A `herald serve` process with TLS settings in `env`; stderr is read line by line into the
/// returned channel (so its pipe never fills), stdout's banner lines until `lines` of them.
struct TlsProcess {
    child: Child,
    banner: Vec<String>,
    log: mpsc::UnboundedReceiver<String>,
    /// Log lines `logged` went past, for failure messages.
    earlier: Vec<String>,
}

async fn spawn_tls(
    data: &Path,
    flags: &[&str],
    env: &[(&str, String)],
    lines: usize,
) -> TlsProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(flags)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_LOG", "info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald");
    let (log_tx, log) = mpsc::unbounded_channel();
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    tokio::spawn(async move {
        loop {
            let line = match stderr.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => format!("(reading herald's stderr failed: {e})"),
            };
            if log_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let banner = tokio::time::timeout(PATIENCE, async {
        let mut banner = Vec::new();
        while banner.len() < lines {
            match stdout.next_line().await.expect("read stdout") {
                Some(line) => banner.push(line),
                None => panic!("herald exited before its banner: {banner:?}"),
            }
        }
        banner
    })
    .await
    .expect("herald did not start");
    // Keep reading stdout so a later write never meets a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    TlsProcess {
        child,
        banner,
        log,
        earlier: Vec::new(),
    }
}

impl TlsProcess {
    fn base(&self) -> String {
        self.banner[0]
            .strip_prefix("herald listening on ")
            .unwrap_or_else(|| panic!("not the listening line: {}", self.banner[0]))
            .to_owned()
    }

    /// Waits for a log line containing every one of `parts`; returns it.
    async fn logged(&mut self, parts: &[&str]) -> String {
        let log = &mut self.log;
        let earlier = &mut self.earlier;
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = log.recv().await {
                if parts.iter().all(|p| line.contains(p)) {
                    return Some(line);
                }
                earlier.push(line);
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "herald's stderr closed before {parts:?} (exit: {:?}): {earlier:#?}",
                self.child.try_wait()
            ),
            Err(_) => panic!("no log line with {parts:?} in {earlier:#?}"),
        }
    }

    async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("pid").to_string();
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .expect("kill");
        assert!(sent.success());
    }

    async fn stop(mut self) {
        self.signal("-TERM").await;
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("herald did not stop")
            .expect("wait");
        assert!(status.success(), "{status}");
    }
}

/// A SIGHUP sent as soon as the banner is read (before the certificate watcher runs, while
/// the store opens) does not kill a TLS server: it goes on serving.
#[tokio::test]
async fn a_sighup_right_after_the_banner_does_not_kill_a_tls_server() {
    let data = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("Herald test CA");
    let files = CertFiles::new(&ca.leaf("early"));
    let mut herald = spawn_tls(data.path(), &[], &files.env(), 1).await;
    herald.signal("-HUP").await;
    let api = Api::new(&herald.base(), &ca);
    let (status, body) = api.call(reqwest::Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        herald.child.try_wait().expect("status").is_none(),
        "still running after the SIGHUP"
    );
    herald.stop().await;
}

#[tokio::test]
async fn sighup_swaps_the_certificate_for_new_connections_while_open_ones_keep_working() {
    let data = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("Herald test CA");
    let (old, new) = (ca.leaf("before SIGHUP"), ca.leaf("after SIGHUP"));
    let files = CertFiles::new(&old);
    let mut env = files.env();
    // Only SIGHUP reloads here: the swap below must wait for it.
    env.push(("HERALD_TLS__WATCH_INTERVAL_MS", "0".into()));
    let mut herald = spawn_tls(data.path(), &[], &env, 1).await;
    let base = herald.base();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let addr = authority(&base);
    let api = Api::new(&base, &ca);
    let (app, key, _) = api.app("tls-sighup").await;

    let mut before = Wss::connect(&addr, &ca, &key).await;
    assert_eq!(before.peer, old.der);
    before.subscribe("orders").await;

    files.install(&new);
    assert_eq!(
        served_certificate(&addr, &ca).await,
        old.der,
        "nothing reloads before SIGHUP when the watcher is off"
    );
    herald.signal("-HUP").await;
    herald.logged(&["TLS certificate reloaded", "SIGHUP"]).await;
    assert_eq!(served_certificate(&addr, &ca).await, new.der);

    let mut after = Wss::connect(&addr, &ca, &key).await;
    assert_eq!(
        after.peer, new.der,
        "a new WebSocket gets the new certificate"
    );
    after.subscribe("orders").await;
    api.publish(&app, "orders", "order.paid", json!({"id": 7}))
        .await;
    let expected = json!({"event": "order.paid", "channel": "orders", "data": "{\"id\":7}"});
    assert_eq!(
        before.event().await,
        expected,
        "the socket opened before SIGHUP"
    );
    assert_eq!(after.event().await, expected);
    // The old socket still talks both ways on its old session.
    before
        .socket
        .send(Message::text(
            json!({"event": "pusher:ping", "data": {}}).to_string(),
        ))
        .await
        .expect("send");
    assert_eq!(before.next().await["event"], "pusher:pong");
    assert_eq!(before.peer, old.der);
    herald.stop().await;
}

#[tokio::test]
async fn a_failed_reload_keeps_the_previous_certificate_and_says_why() {
    let data = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("Herald test CA");
    let (good, other) = (ca.leaf("good"), ca.leaf("other"));
    let files = CertFiles::new(&good);
    let mut env = files.env();
    env.push(("HERALD_TLS__WATCH_INTERVAL_MS", "50".into()));
    let mut herald = spawn_tls(data.path(), &[], &env, 1).await;
    let addr = authority(&herald.base());
    let cert_path = files.cert().display().to_string();

    // Garbage in the certificate file: seen by the watcher, refused, logged with the file.
    replace(
        &files.cert(),
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
    );
    let refused = herald
        .logged(&["TLS certificate reload failed", &cert_path])
        .await;
    assert!(refused.contains("file change"), "{refused}");
    assert_eq!(served_certificate(&addr, &ca).await, good.der);

    // A certificate whose key is not the one in the key file: refused by SIGHUP too.
    replace(&files.cert(), other.cert_pem.as_bytes());
    let mismatch = herald
        .logged(&["TLS certificate reload failed", "does not belong"])
        .await;
    assert!(mismatch.contains(&cert_path), "{mismatch}");
    herald.signal("-HUP").await;
    herald
        .logged(&["TLS certificate reload failed", "SIGHUP"])
        .await;
    assert_eq!(served_certificate(&addr, &ca).await, good.der);

    // A missing key file is refused as well.
    std::fs::remove_file(files.key()).expect("remove the key");
    herald.signal("-HUP").await;
    let missing = herald
        .logged(&[
            "TLS certificate reload failed",
            "cannot read the TLS key file",
        ])
        .await;
    assert!(
        missing.contains(&files.key().display().to_string()),
        "{missing}"
    );
    let api = Api::new(&herald.base(), &ca);
    let (status, _) = api.call(reqwest::Method::GET, "/health/ready", None).await;
    assert_eq!(status, 204, "still serving with the old certificate");

    // Once the pair is whole again, it loads.
    files.install(&other);
    herald.logged(&["TLS certificate reloaded"]).await;
    assert_eq!(served_certificate(&addr, &ca).await, other.der);
    herald.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_at_start_is_an_error_naming_the_file() {
    let ca = TestCa::new("Herald test CA");
    let (leaf, other) = (ca.leaf("leaf"), ca.leaf("other"));
    let data = tempfile::tempdir().expect("dir");
    let files = CertFiles::new(&leaf);

    let start = |env: Vec<(&'static str, String)>| {
        let data = data.path().to_owned();
        async move {
            let output = tokio::time::timeout(
                PATIENCE,
                Command::new(env!("CARGO_BIN_EXE_herald"))
                    .args(["serve", "--listen", "127.0.0.1:0", "--data"])
                    .arg(&data)
                    .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
                    .envs(env)
                    .stdin(Stdio::null())
                    .output(),
            )
            .await
            .expect("herald should exit")
            .expect("run herald");
            assert!(!output.status.success(), "herald started");
            assert!(
                output.stdout.is_empty(),
                "nothing is announced: {}",
                String::from_utf8_lossy(&output.stdout)
            );
            String::from_utf8_lossy(&output.stderr).into_owned()
        }
    };

    replace(&files.cert(), b"this is not a certificate\n");
    let stderr = start(files.env()).await;
    assert!(
        stderr.contains(&files.cert().display().to_string()) && stderr.contains("no certificate"),
        "{stderr}"
    );

    replace(&files.cert(), other.cert_pem.as_bytes());
    let stderr = start(files.env()).await;
    assert!(
        stderr.contains(&files.key().display().to_string()) && stderr.contains("does not belong"),
        "{stderr}"
    );

    let mut env = files.env();
    env[1].1 = files.dir.path().join("missing.key").display().to_string();
    let stderr = start(env).await;
    assert!(
        stderr.contains("missing.key") && stderr.contains("cannot read the TLS key file"),
        "{stderr}"
    );

    let stderr = start(vec![(
        "HERALD_TLS__CERT",
        files.cert().display().to_string(),
    )])
    .await;
    assert!(stderr.contains("tls.key"), "{stderr}");
}

#[tokio::test]
async fn the_plain_health_listener_answers_health_only() {
    let data = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("Herald test CA");
    let files = CertFiles::new(&ca.leaf("health"));
    let mut env = files.env();
    env.push(("HERALD_TLS__HEALTH_LISTEN", "127.0.0.1:0".into()));
    let herald = spawn_tls(data.path(), &[], &env, 2).await;
    let health = herald.banner[1]
        .strip_prefix("health checks on ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|url| url.strip_suffix("/health/live"))
        .unwrap_or_else(|| panic!("not the health line: {}", herald.banner[1]))
        .to_owned();
    assert!(health.starts_with("http://127.0.0.1:"), "{health}");

    // Installed here too: run alone (nextest), no other test has installed it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plain = crate::harness::http_client();
    for path in ["/health/live", "/health/ready"] {
        let response = plain
            .get(format!("{health}{path}"))
            .send()
            .await
            .expect("plain HTTP");
        assert_eq!(response.status(), 204, "{path}");
    }
    // Nothing else: the APIs stay behind TLS.
    for path in [
        "/api/v1/app",
        "/apps/1/events",
        "/socket.io/?EIO=4&transport=polling",
    ] {
        let response = plain
            .get(format!("{health}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("plain HTTP");
        assert_eq!(response.status(), 404, "{path}");
    }
    let api = Api::new(&herald.base(), &ca);
    let (status, _) = api.call(reqwest::Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200, "the API on the TLS listener");
    herald.stop().await;
}

#[tokio::test]
async fn dev_tls_makes_a_self_signed_certificate_once_and_reuses_it() {
    let data = tempfile::tempdir().expect("dir");
    let refused = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--dev-tls", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run herald");
    assert_eq!(refused.status.code(), Some(2), "a usage error");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--dev"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let mut fingerprints = Vec::new();
    for (round, verb) in [(0, "made a"), (1, "reusing the")] {
        // The banner: the listening line, then --dev's lines (the dev TLS line among them).
        let herald = spawn_tls(data.path(), &["--dev", "--dev-tls"], &[], 7).await;
        let base = herald.base();
        assert!(base.starts_with("https://127.0.0.1:"), "{base}");
        let dev_line = herald
            .banner
            .iter()
            .position(|l| l.starts_with("dev TLS: "))
            .unwrap_or_else(|| panic!("no dev TLS line in {:?}", herald.banner));
        assert!(
            herald.banner[dev_line].contains(verb),
            "round {round}: {:?}",
            herald.banner
        );
        let cert_path = data.path().join(herald::tls::DEV_CERT_FILE);
        assert!(
            herald.banner[dev_line].contains(&cert_path.display().to_string()),
            "{:?}",
            herald.banner
        );
        let printed = herald.banner[dev_line + 1]
            .trim()
            .strip_prefix("SHA-256 fingerprint ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no fingerprint in {:?}", herald.banner))
            .to_owned();
        let pem = std::fs::read(&cert_path).expect("the dev certificate");
        let der = CertificateDer::from_pem_slice(&pem).expect("PEM");
        assert_eq!(printed, herald::tls::fingerprint(&der));
        fingerprints.push(printed);

        // A client that trusts the printed certificate (and nothing else) gets through, by
        // name and by address.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("cert")])
            .build()
            .expect("client");
        let port = url::Url::parse(&base)
            .ok()
            .and_then(|u| u.port())
            .expect("port");
        for host in ["127.0.0.1", "localhost"] {
            let response = client
                .get(format!("https://{host}:{port}/api/v1/app"))
                .bearer_auth("demo-token")
                .send()
                .await
                .expect("https with the dev certificate trusted");
            assert_eq!(response.status(), 200, "{host}");
        }
        herald.stop().await;
    }
    assert_eq!(
        fingerprints[0], fingerprints[1],
        "the second start reuses it"
    );
}
