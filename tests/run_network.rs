//! The stage network seen from real pipelines with host steps: names, isolation, port
//! bindings, pod mode. All traffic stays on loopback or inside the run's namespaces.

mod prereq;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{free_port, modes, stage, Sandbox, DOCKER, KUBERNETES};

/// A Background step serving `dir` of the workspace on `port`.
fn server(id: &str, dir: &str, port: u16, bindings: &str) -> String {
    format!(
        "- step:\n    type: Background\n    name: {id}\n    identifier: {id}\n    spec:\n      command: exec python3 -m http.server {port} --directory {dir}\n{bindings}"
    )
}

#[test]
fn steps_resolve_each_other_by_identifier_and_group_name() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("a/who.txt", "I am alpha\n");
        sb.write("b/who.txt", "I am beta\n");
        // Host steps share the build machine (as on Harness's VM runner), so the two
        // services listen on two ports; each is called by its own name.
        let binding =
            |host: u16, port: u16| format!("      portBindings:\n        \"{host}\": \"{port}\"\n");
        let beta: String = server("beta", "b", 8001, &binding(free_port(), 8001))
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect();
        let steps = server("alpha", "a", 8000, &binding(free_port(), 8000))
            + "\n- stepGroup:\n    name: grp\n    identifier: grp\n    steps:\n"
            + &beta
            + r#"- step:
    type: Run
    name: client
    identifier: client
    spec:
      shell: Bash
      command: |
        curl -sf http://alpha:8000/who.txt
        curl -sf http://grp_beta:8001/who.txt
        curl -sf http://GRP_Beta:8001/who.txt
        getent hosts client alpha | awk '{print "resolves", $2}'
"#;
        sb.write("ci.yaml", &stage(DOCKER, &steps));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("| I am alpha")
            .assert_stdout("| I am beta")
            .assert_stdout("resolves alpha");
        let plan = sb.run(["plan", "ci.yaml"]);
        plan.assert_code(0)
            .assert_stdout("hostnames: beta, grp_beta")
            .assert_stdout("address: 10.");
    }
}

/// Two host steps cannot both serve one port: they run side by side on the build
/// machine, as on Harness's VM runner, and the run is refused before anything starts.
#[test]
fn two_host_services_on_one_port_are_refused() {
    let sb = Sandbox::new(modes()[0]);
    let binding = |host: u16| format!("      portBindings:\n        \"{host}\": \"8000\"\n");
    let steps = server("alpha", "a", 8000, &binding(free_port()))
        + &server("beta", "b", 8000, &binding(free_port()));
    sb.write("ci.yaml", &stage(DOCKER, &steps));
    sb.run(["run", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("host steps `alpha` and `beta` both use port 8000");
}

#[test]
fn a_step_cannot_reach_the_host_loopback() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        sb.write(
            "ci.yaml",
            &stage(
                DOCKER,
                &format!(
                    "- step:\n    type: Run\n    name: probe\n    identifier: probe\n    spec:\n      command: |\n        if curl -s --max-time 2 http://127.0.0.1:{port}/; then echo REACHED; else echo isolated; fi\n"
                ),
            ),
        );
        sb.run(["run", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("isolated");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "a connection reached the host");
    }
}

#[test]
fn port_bindings_reach_a_service_from_the_host() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let host_port = free_port();
        sb.write("site/index.html", "served through the proxy\n");
        let steps = server(
            "web",
            "site",
            8080,
            &format!("      portBindings:\n        \"{host_port}\": \"8080\"\n"),
        ) + "- step:\n    type: Run\n    name: hold\n    identifier: hold\n    spec:\n      command: getent hosts web; ip -d link show lo | grep -o 'gso_max_size [0-9]*'; while [ ! -f done ]; do sleep 0.05; done\n";
        sb.write("ci.yaml", &stage(DOCKER, &steps));
        // The proxy, which serves when a service cannot take host connections itself
        // (run_host and run_containers test that hand-off).
        let child = sb
            .command(["run", "ci.yaml"])
            .env("SANDRUN_PORT_HANDOFF", "off")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let body = loop {
            assert!(Instant::now() < deadline, "the port binding never answered");
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", host_port)) {
                let _ = s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("200") {
                    break body;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(body.contains("served through the proxy"), "{body}");
        sb.write("done", "");
        let r = support::Run::from(child.wait_with_output().unwrap());
        r.assert_code(0);
        // The binding ends with the stage.
        assert!(TcpStream::connect(("127.0.0.1", host_port)).is_err());
        // The proxy dials from the step's own namespace, to the step's stage address:
        // the service sees that address as the peer (the connection ran over the
        // namespace's loopback device, not the bridge).
        let out = &r.stdout;
        let web = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("hold | ")?
                    .strip_suffix(" web")
                    .map(str::trim)
            })
            .unwrap_or_else(|| panic!("no address for web: {out}"));
        assert!(
            out.lines().any(|l| l.starts_with("web ")
                && l.contains(&format!("| {web} - -"))
                && l.contains("GET /index.html")),
            "{out}"
        );
        // Stage namespaces' loopback devices use 256 KiB segments where the kernel
        // has BIG TCP for IPv4 (6.3 and later).
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        let expected = if (major, minor) >= (6, 3) {
            262144
        } else {
            65536
        };
        assert!(
            out.contains(&format!("hold | gso_max_size {expected}")),
            "{out}"
        );
    }
}

#[test]
fn a_busy_host_port_is_refused_before_any_step_starts() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let steps = "- step:\n    type: Run\n    name: first\n    identifier: first\n    spec:\n      command: touch started\n".to_string()
            + &server("web", ".", 8080, &format!("      portBindings:\n        \"{port}\": \"8080\"\n"));
        sb.write("ci.yaml", &stage(DOCKER, &steps));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(1)
            .assert_stdout(&port.to_string())
            .assert_stdout("no step was started");
        assert!(!sb.workspace().join("started").exists());
    }
}

#[test]
fn pod_mode_services_are_on_localhost_and_by_name() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("s/who.txt", "pod service\n");
        let steps = server("svc", "s", 9000, "")
            + r#"- step:
    type: Run
    name: client
    identifier: client
    spec:
      command: |
        until curl -sf http://localhost:9000/who.txt; do sleep 0.1; done
        curl -sf http://svc:9000/who.txt
"#;
        sb.write("ci.yaml", &stage(KUBERNETES, &steps));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0);
        assert_eq!(r.stdout.matches("| pod service").count(), 2, "{}", r.all());
        sb.run(["plan", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("network: pod");
    }
}

#[test]
fn pod_mode_names_the_step_that_holds_a_port_another_service_wanted() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("s/who.txt", "pod service\n");
        // Both serve on 9000 in one shared network: whichever binds second dies with
        // "Address already in use", and the report names the other one.
        let steps = server("first", "s", 9000, "")
            + &server("second", "s", 9000, "")
            + r#"- step:
    type: Run
    name: wait
    identifier: wait
    spec:
      command: sleep 3
"#;
        sb.write("ci.yaml", &stage(KUBERNETES, &steps));
        let r = sb.run(["run", "ci.yaml"]);
        assert_ne!(r.code, 0, "{}", r.all());
        let out = r.all();
        assert!(out.contains("Address already in use"), "{out}");
        let named = [("second", "first"), ("first", "second")]
            .iter()
            .any(|(dead, holder)| {
                out.contains(&format!(
                    "`{dead}` could not bind its port: port 9000 is taken by `{holder}` (listening now)"
                ))
            });
        assert!(
            named,
            "the report should name both steps and port 9000:\n{out}"
        );
    }
}
