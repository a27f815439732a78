//! Measurements behind `bench/net.sh` (not a test): stage network setup time,
//! first-connection latency between two steps, port-proxy throughput (and its CPU
//! cost) and the delay it adds to small requests, against a direct loopback connection. All traffic stays on loopback or inside the
//! namespaces made here.
//!
//! Run as root, or rootless inside `sandrun __unshare`.
//!
//!   net_bench setup STEPS TRIALS
//!   net_bench latency TRIALS
//!   net_bench proxy MIB TRIALS
//!   net_bench request TRIALS

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use sandrun::net::{
    allocate, HostPortProxy, NetworkMode, NetworkPlan, ProxyServer, StageNetwork, StepRequest,
};

fn steps(n: usize, bind: Option<(u16, u16)>) -> Vec<StepRequest> {
    (0..n)
        .map(|i| StepRequest {
            key: format!("s{i}"),
            hostnames: vec![format!("s{i}")],
            port_bindings: if i == 0 {
                bind.into_iter().map(Into::into).collect()
            } else {
                vec![]
            },
            on_machine: false,
        })
        .collect()
}

/// Runs `f` on a new thread that has joined the namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: OwnedFd,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

fn stats(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{label}: n={} min={:.3} median={:.3} p99={:.3} max={:.3} ms",
        ms.len(),
        ms[0],
        pct(0.5),
        pct(0.99),
        ms[ms.len() - 1]
    );
}

async fn setup(n: usize, trials: usize, state: &Path) {
    let plan = allocate(NetworkMode::Bridge, &steps(n, None)).unwrap();
    let mut create = Vec::new();
    let mut teardown = Vec::new();
    for _ in 0..trials {
        let t = Instant::now();
        let net = StageNetwork::create(&plan, state).await.unwrap();
        create.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        net.teardown().await;
        teardown.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median_per_step = {
        let mut c = create.clone();
        c.sort_by(|a, b| a.partial_cmp(b).unwrap());
        c[c.len() / 2] / n as f64
    };
    stats(&format!("setup {n:>2} steps (create)"), create);
    stats(&format!("setup {n:>2} steps (teardown)"), teardown);
    println!("setup {n:>2} steps: {median_per_step:.3} ms per step (median)");
}

/// A fresh two-step network per trial; the first connect + 1-byte echo from step 1 to
/// step 0 right after `create` returns.
async fn latency(trials: usize, state: &Path) {
    let plan = allocate(NetworkMode::Bridge, &steps(2, None)).unwrap();
    let target = SocketAddr::from((plan.steps[0].address, 7000));
    let mut ms = Vec::new();
    for _ in 0..trials {
        let net = StageNetwork::create(&plan, state).await.unwrap();
        let server_ns = net.step_netns("s0").unwrap().try_clone_to_owned().unwrap();
        let client_ns = net.step_netns("s1").unwrap().try_clone_to_owned().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = in_netns(server_ns, move || {
            let listener = TcpListener::bind("0.0.0.0:7000").unwrap();
            ready_tx.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).unwrap();
            conn.write_all(&b).unwrap();
        });
        ready_rx.recv().unwrap();
        let elapsed = in_netns(client_ns, move || {
            let t = Instant::now();
            let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            t.elapsed()
        })
        .join()
        .unwrap();
        server.join().unwrap();
        ms.push(elapsed.as_secs_f64() * 1e3);
        net.teardown().await;
    }
    let stalls = ms.iter().filter(|&&m| m > 100.0).count();
    stats("first connection step->step", ms);
    println!("first connection stalls over 100 ms: {stalls}");
}

/// Sink server: reads until EOF, then answers with the byte count.
fn sink(listener: TcpListener) {
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    conn.write_all(&total.to_le_bytes()).unwrap();
}

/// CPU time (user + system) this process has used so far, in seconds: every party of
/// the throughput test (client, proxy, server) is a thread of this process, so the
/// difference over a transfer is what moving the bytes cost, whatever else runs on
/// the machine.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage(2) fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn push(addr: SocketAddr, bytes: u64) -> f64 {
    let buf = vec![7u8; 256 * 1024];
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&buf).unwrap();
        sent += buf.len() as u64;
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut ack = [0u8; 8];
    c.read_exact(&mut ack).unwrap();
    assert_eq!(u64::from_le_bytes(ack), sent);
    sent as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// A two-step network whose step `s0` has a host port bound to its port 9000 through
/// the port proxy, already serving.
async fn proxied_network(state: &Path) -> (u16, NetworkPlan, StageNetwork, ProxyServer) {
    let host_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let plan = allocate(NetworkMode::Bridge, &steps(2, Some((host_port, 9000)))).unwrap();
    let bound = HostPortProxy::bind(Ipv4Addr::LOCALHOST.into(), &plan).unwrap();
    let net = StageNetwork::create(&plan, state).await.unwrap();
    let served = bound.serve(&net, None).unwrap();
    (host_port, plan, net, served)
}

/// Runs `serve` on a listener on `port` inside step `key`; returns once it listens.
fn serve_in_step<T: Send + 'static>(
    net: &StageNetwork,
    key: &str,
    port: u16,
    serve: impl FnOnce(TcpListener) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = net.step_netns(key).unwrap().try_clone_to_owned().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_netns(ns, move || {
        let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
        ready_tx.send(()).unwrap();
        serve(listener)
    });
    ready_rx.recv().unwrap();
    server
}

async fn proxy(mib: u64, trials: usize, state: &Path) {
    let bytes = mib << 20;
    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    let mut bridged = Vec::new();
    let mut cpu = [Vec::new(), Vec::new(), Vec::new()];
    let gib = bytes as f64 / (1u64 << 30) as f64;
    for _ in 0..trials {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || sink(listener));
        let c = cpu_seconds();
        let mbps = tokio::task::spawn_blocking(move || push(addr, bytes))
            .await
            .unwrap();
        server.join().unwrap();
        cpu[0].push((cpu_seconds() - c) / gib);
        direct.push(mbps);

        let (host_port, plan, net, served) = proxied_network(state).await;
        let server = serve_in_step(&net, "s0", 9000, sink);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, host_port));
        let c = cpu_seconds();
        let mbps = tokio::task::spawn_blocking(move || push(addr, bytes))
            .await
            .unwrap();
        server.join().unwrap();
        cpu[1].push((cpu_seconds() - c) / gib);
        proxied.push(mbps);

        // The same step service, reached from another step without the proxy.
        let server = serve_in_step(&net, "s0", 9001, sink);
        let addr = SocketAddr::from((plan.steps[0].address, 9001));
        let client_ns = net.step_netns("s1").unwrap().try_clone_to_owned().unwrap();
        let c = cpu_seconds();
        let mbps = in_netns(client_ns, move || push(addr, bytes))
            .join()
            .unwrap();
        server.join().unwrap();
        cpu[2].push((cpu_seconds() - c) / gib);
        bridged.push(mbps);
        served.shutdown().await;
        net.teardown().await;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (d, p, b) = (median(direct), median(proxied), median(bridged));
    let [cd, cp, cb] = cpu.map(median);
    println!("throughput direct loopback: {d:.0} MiB/s (median of {trials}, {mib} MiB each)");
    println!("throughput step to step through the hub (no proxy): {b:.0} MiB/s");
    println!("throughput through port proxy: {p:.0} MiB/s");
    println!("proxy/direct: {:.2}x", p / d);
    println!(
        "CPU per GiB moved (all parties): direct {cd:.2} s, step to step {cb:.2} s, proxy {cp:.2} s"
    );
}

/// Echo server for the request test: answers every read with the same bytes, for
/// `conns` connections one after another.
fn echo(listener: TcpListener, conns: usize) {
    let mut buf = [0u8; 4096];
    for _ in 0..conns {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_nodelay(true).unwrap();
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => conn.write_all(&buf[..n]).unwrap(),
            }
        }
    }
}

/// Small requests: `trials` fresh connections (connect, 100-byte request, 100-byte
/// answer, close) and `trials` round trips on one kept-alive connection, each timed.
fn requests(addr: SocketAddr, trials: usize) -> (Vec<f64>, Vec<f64>) {
    let req = [1u8; 100];
    let mut ans = [0u8; 100];
    let mut fresh = Vec::new();
    for _ in 0..trials {
        let t = Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_nodelay(true).unwrap();
        c.write_all(&req).unwrap();
        c.read_exact(&mut ans).unwrap();
        fresh.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut kept = Vec::new();
    for _ in 0..trials {
        let t = Instant::now();
        c.write_all(&req).unwrap();
        c.read_exact(&mut ans).unwrap();
        kept.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (fresh, kept)
}

/// Delay the proxy adds to a small request: the same echo service reached over direct
/// loopback and through the port proxy, alternating in rounds of 50.
async fn request(trials: usize, state: &Path) {
    let (host_port, _, net, served) = proxied_network(state).await;
    let rounds = trials.div_ceil(50);
    let per_round = trials / rounds;
    let conns = rounds * (per_round + 1);
    let server = serve_in_step(&net, "s0", 9000, move |l| echo(l, conns));
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let local_addr = local.local_addr().unwrap();
    let local_server = std::thread::spawn(move || echo(local, conns));
    let proxied_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, host_port));
    let (mut df, mut dk, mut pf, mut pk) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (f, k) = tokio::task::spawn_blocking(move || requests(local_addr, per_round))
            .await
            .unwrap();
        df.extend(f);
        dk.extend(k);
        let (f, k) = tokio::task::spawn_blocking(move || requests(proxied_addr, per_round))
            .await
            .unwrap();
        pf.extend(f);
        pk.extend(k);
    }
    server.join().unwrap();
    local_server.join().unwrap();
    stats("request, new connection, direct loopback", df);
    stats("request, new connection, through proxy  ", pf);
    stats("request, kept connection, direct loopback", dk);
    stats("request, kept connection, through proxy  ", pk);
    served.shutdown().await;
    net.teardown().await;
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let state = tempfile::tempdir().unwrap();
    match args.get(1).map(String::as_str) {
        Some("setup") => setup(num(2, 10) as usize, num(3, 20) as usize, state.path()).await,
        Some("latency") => latency(num(2, 200) as usize, state.path()).await,
        Some("proxy") => proxy(num(2, 1024), num(3, 3) as usize, state.path()).await,
        Some("request") => request(num(2, 1000) as usize, state.path()).await,
        _ => {
            eprintln!(
                "usage: net_bench setup STEPS TRIALS | latency TRIALS | proxy MIB TRIALS | request TRIALS"
            );
            std::process::exit(2);
        }
    }
}
