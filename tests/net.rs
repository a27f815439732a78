//! The stage network, for real: namespaces, links, per-step files and the port proxy,
//! with real clients (curl, getent, python) and servers (python's http.server) run
//! inside the step namespaces. Every scenario runs as root and, rootless, as the
//! unprivileged user `sandrun-test` inside `sandrun __unshare` (which re-runs this test
//! binary there, selecting the scenario through `SANDRUN_NET_SCENARIO`).
//!
//! All traffic stays on loopback or inside namespaces the test made.

mod prereq;
mod rootless;

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sandrun::net::{
    allocate, step_hostnames, HostPortProxy, NetError, NetworkMode, NetworkPlan, StageNetwork,
    StepJoin, StepRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SANDRUN: &str = env!("CARGO_BIN_EXE_sandrun");
const SCENARIO_ENV: &str = "SANDRUN_NET_SCENARIO";

// ---------------------------------------------------------------- helpers

fn req(key: &str, names: Vec<String>, ports: &[(u16, u16)]) -> StepRequest {
    StepRequest {
        key: key.into(),
        hostnames: names,
        port_bindings: ports.iter().map(|&p| p.into()).collect(),
        on_machine: false,
    }
}

fn command_in(join: StepJoin, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: StepJoin::enter only makes system calls.
    unsafe { cmd.pre_exec(move || join.enter()) };
    cmd
}

/// Runs a client in the host step `key` and returns its output.
fn run_in(net: &StageNetwork, key: &str, program: &str, args: &[&str]) -> Output {
    command_in(net.host_join(key).unwrap(), program, args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// The address glibc's `getent hosts NAME` gives in step `key`.
fn resolve(net: &StageNetwork, key: &str, name: &str) -> String {
    let out = run_in(net, key, "getent", &["hosts", name]);
    text(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A python http.server in a step, serving a file `id` that names the step.
struct Server(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_in(net: &StageNetwork, key: &str, port: u16, id: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("id"), id).unwrap();
    let child = command_in(
        net.host_join(key).unwrap(),
        "python3",
        &["-m", "http.server", &port.to_string(), "--bind", "0.0.0.0"],
    )
    .current_dir(dir.path())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    Server(child, dir)
}

/// Fetches `url` with curl from step `key`, retrying while the server starts.
fn fetch(net: &StageNetwork, key: &str, url: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_in(net, key, "curl", &["-sS", "--max-time", "2", url]);
        if out.status.success() {
            return Ok(text(&out));
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if Instant::now() > deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that a connection from step `key` to `url` is refused at once (curl exit 7,
/// "couldn't connect"), not timed out and not answered.
fn assert_refused(net: &StageNetwork, key: &str, url: &str) {
    let started = Instant::now();
    let out = run_in(net, key, "curl", &["-sS", "--max-time", "3", url]);
    assert_eq!(out.status.code(), Some(7), "{url} from {key}: {out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get_from_host(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

fn net_ns_links_of_self() -> Vec<String> {
    let mut found = Vec::new();
    for dir in ["/proc/self/fd", "/proc/self/task"] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = if dir.ends_with("task") {
                entry.path().join("ns/net")
            } else {
                entry.path()
            };
            if let Ok(target) = std::fs::read_link(&path) {
                let target = target.to_string_lossy().to_string();
                if target.starts_with("net:[") {
                    found.push(target);
                }
            }
        }
    }
    found
}

fn own_netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .unwrap()
        .to_string_lossy()
        .to_string()
}

// ---------------------------------------------------------------- scenarios

/// Steps find each other by identifier and as GroupId_StepId, case-insensitively,
/// with glibc (getent, curl, python) clients; two servers share a port.
async fn names_and_shared_port(state: &Path) {
    let plan = allocate(
        NetworkMode::Bridge,
        &[
            req("db", step_hostnames("db", None), &[]),
            req("Svc/web", step_hostnames("web", Some("Svc")), &[]),
            req("Client", step_hostnames("Client", None), &[]),
        ],
    )
    .unwrap();
    let net = StageNetwork::create(&plan, state).await.unwrap();
    let _db = serve_in(&net, "db", 8000, "db");
    let _web = serve_in(&net, "Svc/web", 8000, "web");

    assert_eq!(fetch(&net, "Client", "http://db:8000/id").unwrap(), "db");
    assert_eq!(
        fetch(&net, "Client", "http://Svc_web:8000/id").unwrap(),
        "web"
    );
    assert_eq!(
        fetch(&net, "Client", "http://svc_web:8000/id").unwrap(),
        "web"
    );
    assert_eq!(fetch(&net, "db", "http://WEB:8000/id").unwrap(), "web");

    assert_eq!(resolve(&net, "db", "CLIENT"), "10.213.0.4");
    let out = run_in(
        &net,
        "Client",
        "python3",
        &[
            "-c",
            "import socket; print(socket.gethostbyname('Svc_Web'))",
        ],
    );
    assert_eq!(text(&out), "10.213.0.3", "{out:?}");

    // The step sees its own files, not the host's.
    let out = run_in(&net, "Client", "cat", &["/etc/resolv.conf", "/etc/hosts"]);
    assert!(text(&out).contains("written by sandrun"), "{out:?}");
    assert!(!text(&out).contains("nameserver"), "{out:?}");
    // A DNS lookup fails at once instead of waiting for a server.
    let started = Instant::now();
    let out = run_in(&net, "Client", "getent", &["hosts", "nothing.example"]);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Container steps: only the namespace is joined.
    let step_ns = std::fs::metadata(format!(
        "/proc/self/fd/{}",
        net.step_netns("db").unwrap().as_raw_fd()
    ))
    .unwrap()
    .ino();
    let out = command_in(
        net.container_join("db").unwrap(),
        "readlink",
        &["/proc/self/ns/net"],
    )
    .output()
    .unwrap();
    assert_eq!(text(&out), format!("net:[{step_ns}]"));
    net.teardown().await;
}

/// Steps reach neither the host's loopback services nor anything outside.
async fn isolation(state: &Path) {
    let host_service = StdListener::bind("127.0.0.1:0").unwrap();
    let port = host_service.local_addr().unwrap().port();
    let plan = allocate(NetworkMode::Bridge, &[req("a", vec!["a".into()], &[])]).unwrap();
    let net = StageNetwork::create(&plan, state).await.unwrap();

    assert_refused(&net, "a", &format!("http://127.0.0.1:{port}/"));
    // No route out: the kernel refuses at once, nothing leaves the namespace.
    let out = run_in(
        &net,
        "a",
        "python3",
        &[
            "-c",
            "import socket,errno\ntry:\n socket.create_connection(('192.0.2.1', 80), 3)\nexcept OSError as e:\n print(errno.errorcode[e.errno])",
        ],
    );
    assert_eq!(text(&out), "ENETUNREACH", "{out:?}");
    net.teardown().await;
}

/// Two networks at once, with the same addresses and names, do not see each other.
async fn concurrent_networks(state: &Path) {
    let steps = [
        req("db", vec!["db".into()], &[]),
        req("client", vec!["client".into()], &[]),
    ];
    let plan = allocate(NetworkMode::Bridge, &steps).unwrap();
    let (one, two) = (state.join("one"), state.join("two"));
    let (a, b) = tokio::join!(
        StageNetwork::create(&plan, &one),
        StageNetwork::create(&plan, &two)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let _server = serve_in(&a, "db", 8000, "run-a");
    assert_eq!(fetch(&a, "client", "http://db:8000/id").unwrap(), "run-a");
    assert_refused(&b, "client", "http://db:8000/id");
    assert_ne!(
        std::fs::read_link(format!(
            "/proc/self/fd/{}",
            a.step_netns("db").unwrap().as_raw_fd()
        ))
        .unwrap(),
        std::fs::read_link(format!(
            "/proc/self/fd/{}",
            b.step_netns("db").unwrap().as_raw_fd()
        ))
        .unwrap()
    );
    a.teardown().await;
    b.teardown().await;
}

/// Pod mode: `localhost:PORT` reaches a service of another step, and identifiers
/// resolve to the shared address.
async fn pod_mode(state: &Path) {
    let plan = allocate(
        NetworkMode::Pod,
        &[
            req("cache", step_hostnames("cache", None), &[]),
            req("app", step_hostnames("app", None), &[]),
        ],
    )
    .unwrap();
    let net = StageNetwork::create(&plan, state).await.unwrap();
    let _cache = serve_in(&net, "cache", 8001, "cache");
    assert_eq!(
        fetch(&net, "app", "http://localhost:8001/id").unwrap(),
        "cache"
    );
    assert_eq!(fetch(&net, "app", "http://cache:8001/id").unwrap(), "cache");
    assert_eq!(resolve(&net, "app", "app"), "10.213.0.2");
    net.teardown().await;
}

/// portBindings: a step's service reached from the host's loopback, in both modes;
/// a busy host port refused before anything starts.
async fn port_bindings(state: &Path) {
    for mode in [NetworkMode::Bridge, NetworkMode::Pod] {
        let host_port = free_port();
        let plan = allocate(
            mode,
            &[
                req("web", vec!["web".into()], &[(host_port, 8080)]),
                req("other", vec!["other".into()], &[]),
            ],
        )
        .unwrap();
        let proxy = HostPortProxy::bind(Ipv4Addr::LOCALHOST.into(), &plan).unwrap();
        assert_eq!(
            proxy.local_addrs(),
            vec![(
                "web".to_string(),
                SocketAddr::from((Ipv4Addr::LOCALHOST, host_port))
            )]
        );
        let net = StageNetwork::create(&plan, state).await.unwrap();
        let server = proxy.serve(&net, None).unwrap();
        let _web = serve_in(&net, "web", 8080, &format!("web-{mode}"));
        // Wait until the service listens (checked from inside), then go through the proxy.
        fetch(
            &net,
            "other",
            &format!("http://{}:8080/id", plan.step("web").unwrap().address),
        )
        .unwrap();
        for _ in 0..3 {
            let body = http_get_from_host(host_port, "/id").await.unwrap();
            assert!(body.ends_with(&format!("web-{mode}")), "{body}");
        }
        server.shutdown().await;
        // After the stage, the host port is closed again.
        assert!(
            tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, host_port))
                .await
                .is_err()
        );
        net.teardown().await;
    }

    let busy = StdListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let plan = allocate(NetworkMode::Bridge, &[req("db", vec![], &[(port, 5432)])]).unwrap();
    let err = HostPortProxy::bind(Ipv4Addr::LOCALHOST.into(), &plan)
        .err()
        .unwrap();
    assert!(
        matches!(&err, NetError::HostPortBusy { key, port: p, .. } if key == "db" && *p == port),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// Teardown leaves no namespace, link, descriptor, thread or file behind.
async fn teardown_leaves_nothing(state: &Path) {
    let links_before = std::fs::read_dir("/sys/class/net").unwrap().count();
    let own = own_netns();
    let steps: Vec<StepRequest> = (0..5)
        .map(|i| req(&format!("s{i}"), vec![format!("s{i}")], &[]))
        .collect();
    let plan: NetworkPlan = allocate(NetworkMode::Bridge, &steps).unwrap();
    let net = StageNetwork::create(&plan, state).await.unwrap();
    let hosts = net.hosts_file("s0").unwrap().to_path_buf();
    assert!(hosts.exists());
    assert!(net_ns_links_of_self().iter().any(|l| *l != own));
    assert_eq!(
        std::fs::read_dir("/sys/class/net").unwrap().count(),
        links_before
    );
    net.teardown().await;
    // Its namespaces are retired (closed together later, `net::netns`): only they
    // are left, and closing them leaves nothing.
    assert_eq!(
        net_ns_links_of_self().iter().filter(|l| **l != own).count(),
        6,
        "the hub and five step namespaces"
    );
    sandrun::net::release_retired();
    assert_nothing_left(state, &own);
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(text(&out).is_empty(), "{out:?}");

    // Dropping without teardown (a panic unwinding) cleans up the same way.
    let net = StageNetwork::create(&plan, state).await.unwrap();
    drop(net);
    sandrun::net::release_retired();
    assert_nothing_left(state, &own);
}

fn assert_nothing_left(state: &Path, own: &str) {
    assert!(!state.join("net").exists());
    let leftover: Vec<String> = net_ns_links_of_self()
        .into_iter()
        .filter(|l| l != own)
        .collect();
    assert!(
        leftover.is_empty(),
        "namespaces still referenced: {leftover:?}"
    );
}

/// Egress is opt-in; where slirp4netns cannot run, the error says why.
async fn egress_opt_in(state: &Path) {
    let mut plan = allocate(NetworkMode::Bridge, &[req("a", vec!["a".into()], &[])]).unwrap();
    plan.egress = true;
    match StageNetwork::create(&plan, state).await {
        Ok(net) => {
            let out = run_in(&net, "a", "cat", &["/etc/resolv.conf", "/proc/net/route"]);
            let out = text(&out);
            assert!(out.contains("nameserver 10.0.2.3"), "{out}");
            assert!(
                out.contains("tap0\t00000000\t0202000A"),
                "default route via slirp: {out}"
            );
            // The host's loopback stays out of reach (slirp's 10.0.2.2 maps to it
            // unless disabled).
            let host_service = StdListener::bind("127.0.0.1:0").unwrap();
            let port = host_service.local_addr().unwrap().port();
            assert_refused(&net, "a", &format!("http://10.0.2.2:{port}/"));
            net.teardown().await;
        }
        Err(NetError::EgressUnavailable(reason)) => {
            eprintln!("egress unavailable here, as reported: {reason}");
            assert!(
                reason.contains("/dev/net/tun") || reason.contains("slirp4netns"),
                "{reason}"
            );
            let real_root =
                nix::unistd::geteuid().is_root() && !sandrun::sandbox::userns::in_user_namespace();
            assert!(
                !real_root || reason.contains("not installed"),
                "as real root egress should work when slirp4netns is installed: {reason}"
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

// ---------------------------------------------------------------- drivers

async fn run_scenario(name: &str, state: &Path) {
    match name {
        "names_and_shared_port" => names_and_shared_port(state).await,
        "isolation" => isolation(state).await,
        "concurrent_networks" => concurrent_networks(state).await,
        "pod_mode" => pod_mode(state).await,
        "port_bindings" => port_bindings(state).await,
        "teardown_leaves_nothing" => teardown_leaves_nothing(state).await,
        "egress_opt_in" => egress_opt_in(state).await,
        other => panic!("no scenario {other}"),
    }
}

fn as_root(name: &str) {
    if !nix::unistd::geteuid().is_root() {
        prereq::missing(
            "network namespaces need root here (the rootless variant runs via sandrun-test)",
        );
        return;
    }
    // One at a time: the teardown scenario checks that no namespace of this process
    // is left, which other scenarios running alongside would contradict. That only
    // happens under `cargo test` (threads of one process); nextest runs each test in a
    // process of its own and serialises this file through its `network` test group.
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let state = tempfile::tempdir().unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(run_scenario(name, state.path()));
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rootless(name: &str) {
    let Some(user) = rootless::test_user() else {
        return;
    };
    let me = std::env::current_exe().unwrap();
    let out = user
        .command(SANDRUN)
        .arg("__unshare")
        .arg(&me)
        .args([
            "--exact",
            "scenario_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO_ENV, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "rootless scenario {name} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The entry point of the rootless runs above (does nothing in a normal test run).
#[test]
fn scenario_child() {
    let Ok(name) = std::env::var(SCENARIO_ENV) else {
        return;
    };
    assert!(sandrun::sandbox::userns::in_user_namespace() || nix::unistd::geteuid().is_root());
    let state = tempfile::tempdir().unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(run_scenario(&name, state.path()));
}

macro_rules! scenarios {
    ($($name:ident),*) => {
        mod root { $( #[test] fn $name() { super::as_root(stringify!($name)); } )* }
        mod unprivileged { $( #[test] fn $name() { super::rootless(stringify!($name)); } )* }
    };
}

scenarios!(
    names_and_shared_port,
    isolation,
    concurrent_networks,
    pod_mode,
    port_bindings,
    teardown_leaves_nothing,
    egress_opt_in
);
