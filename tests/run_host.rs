//! End-to-end runs of the real binary with host steps (no image): the executor's
//! semantics with real processes, as root and rootless.

mod prereq;
mod support;

use std::time::{Duration, Instant};

use support::{assert_no_process, free_port, modes, spawn_until, Sandbox};

fn stage(steps: &str) -> String {
    support::stage(support::DOCKER, steps)
}

/// Python that leaves `s`, a TCP socket bound to port 8000 of every IPv4 address.
const PY_LISTEN_8000: &str = "import socket\n\
     s = socket.socket()\n\
     s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
     s.bind(('0.0.0.0', 8000))\n";

/// A Background step `svc` running `command` with host port `host_port` bound to its
/// port 8000, and a Run step that runs `first` then waits (its command line carries
/// `wait{tag}`) until the workspace has a file `done`.
fn service_and_hold(command: &str, host_port: u16, first: &str, tag: u16) -> String {
    stage(&format!(
        r#"- step:
    type: Background
    name: svc
    identifier: svc
    spec:
      shell: Sh
      command: {command}
      portBindings:
        "{host_port}": "8000"
- step:
    type: Run
    name: hold
    identifier: hold
    spec:
      shell: Sh
      command: |
        {first}
        while [ ! -f done ]; do sleep 0.1; done # wait{tag}
"#
    ))
}

#[test]
fn background_service_is_reached_then_stopped() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let port = free_port();
        let marker = format!("http.server {port}");
        sb.write("index.html", "hello from the service\n");
        sb.write(
            "ci.yaml",
            &stage(&format!(
                r#"- step:
    type: Background
    name: web server
    identifier: web
    spec:
      shell: Sh
      command: exec python3 -m http.server {port} --bind 127.0.0.1
      portBindings:
        "{port}": "{port}"
- step:
    type: Run
    name: fetch
    identifier: fetch
    spec:
      shell: Bash
      command: curl -sf http://127.0.0.1:{port}/index.html
"#
            )),
        );
        let r = sb.run(["run", "ci.yaml", "--network", "pod"]);
        r.assert_code(0)
            .assert_stdout("fetch")
            .assert_stdout("hello from the service")
            .assert_stdout("ready after");
        assert!(r.summary_row("web").contains("stopped"), "{}", r.all());
        assert!(r.summary_row("fetch").contains("passed"), "{}", r.all());
        assert_no_process(&marker);
    }
}

#[test]
fn a_service_that_dies_fails_the_stage_with_its_last_lines() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Background
    name: db
    identifier: db
    spec:
      command: |
        echo "FATAL: could not bind port"
        exit 4
- step:
    type: Run
    name: wait
    identifier: wait
    spec:
      command: sleep 1
- step:
    type: Run
    name: after
    identifier: after
    spec:
      command: echo should not run
"#,
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(1)
            .assert_stdout("service died while the stage was running: exit code 4")
            .assert_stdout("│ FATAL: could not bind port");
        assert!(r.summary_row("db").contains("FAILED"), "{}", r.all());
        assert!(r.summary_row("after").contains("skipped"), "{}", r.all());
        assert!(!r.stdout.contains("should not run\n"), "{}", r.all());
    }
}

#[test]
fn output_variables_flow_into_later_steps_and_groups() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: version
    identifier: version
    spec:
      shell: Bash
      command: |
        VERSION="1.2.$((40 + 2))"
        unused=1
      outputVariables:
        - name: VERSION
- stepGroup:
    name: pkg
    identifier: pkg
    steps:
      - step:
          type: Run
          name: build
          identifier: build
          spec:
            shell: Python
            command: |
              ARTIFACT = "app-<+steps.version.output.outputVariables.VERSION>.tar"
            outputVariables:
              - name: ARTIFACT
- step:
    type: Run
    name: publish
    identifier: publish
    spec:
      command: echo "publishing <+execution.steps.pkg.steps.build.output.outputVariables.ARTIFACT>"
"#,
            ),
        );
        sb.run(["run", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("publishing app-1.2.42.tar");
    }
}

#[test]
fn parallel_steps_overlap_in_time() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let step = |id: &str| {
            format!(
                r#"  - step:
      type: Run
      name: {id}
      identifier: {id}
      spec:
        command: date +%s.%N > {id}.start; sleep 1; date +%s.%N > {id}.end
"#
            )
        };
        sb.write(
            "ci.yaml",
            &stage(&format!("- parallel:\n{}{}", step("left"), step("right"))),
        );
        sb.run(["run", "ci.yaml"]).assert_code(0);
        let read = |f: &str| -> f64 {
            std::fs::read_to_string(sb.workspace().join(f))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        // Each started before the other ended: the intervals intersect.
        assert!(read("left.start") < read("right.end"));
        assert!(read("right.start") < read("left.end"));
    }
}

#[test]
fn a_step_past_its_timeout_is_killed_and_fails_the_stage() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let marker = format!("sleep 1{}", free_port());
        // `trap` keeps sh alive around sleep, so the marker stays in a command line.
        sb.write(
            "ci.yaml",
            &stage(&format!(
                r#"- step:
    type: Run
    name: slow
    identifier: slow
    timeout: 1s
    spec:
      command: trap '' TERM; {marker}
"#
            )),
        );
        let started = Instant::now();
        let r = sb.run(["run", "ci.yaml", "--grace", "500ms"]);
        r.assert_code(1).assert_stdout("timed out (limit 1.0s)");
        assert!(r.summary_row("slow").contains("TIMED OUT"), "{}", r.all());
        // The step ignores SIGTERM: only SIGKILL after the grace period ends it.
        assert!(started.elapsed() < Duration::from_secs(8), "{}", r.all());
        assert_no_process(&marker);
    }
}

/// A stage past its own `timeout` stops its steps as Ctrl-C would: SIGTERM (a trap
/// runs), the grace period, SIGKILL; each stopped step has its row, timed out, and
/// the steps after it are skipped.
#[test]
fn a_stage_past_its_timeout_stops_its_steps_with_sigterm_and_reports_them() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let marker = format!("sleep 2{}", free_port());
        let stage = stage(&format!(
            r#"- parallel:
  - step:
      type: Run
      name: trapping
      identifier: trapping
      spec:
        command: |
          trap 'echo trap ran; exit 3' TERM
          {marker} &
          wait
  - step:
      type: Run
      name: stubborn
      identifier: stubborn
      spec:
        command: trap '' TERM; {marker}
- step:
    type: Run
    name: after
    identifier: after
    spec:
      command: echo never
"#
        ))
        .replacen("  spec:\n", "  timeout: 2s\n  spec:\n", 1);
        sb.write("ci.yaml", &stage);
        let r = sb.run(["run", "ci.yaml", "--grace", "1s"]);
        r.assert_code(1).assert_stdout("trap ran");
        assert!(r.all().contains("ran past its timeout"), "{}", r.all());
        for step in ["trapping", "stubborn"] {
            assert!(r.summary_row(step).contains("TIMED OUT"), "{}", r.all());
        }
        assert!(r.summary_row("after").contains("skipped"), "{}", r.all());
        assert_no_process(&marker);
    }
}

#[test]
fn failure_strategies_retry_ignore_and_abort() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: flaky
    identifier: flaky
    spec:
      command: |
        n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count
        [ "$n" -ge 3 ]
    failureStrategies:
      - onFailure:
          errors: [AllErrors]
          action:
            type: Retry
            spec:
              retryCount: 3
              retryIntervals: [100ms]
              onRetryFailure:
                action:
                  type: MarkAsFailure
- step:
    type: Run
    name: tolerated
    identifier: tolerated
    spec:
      command: exit 7
    failureStrategies:
      - onFailure:
          errors: [AllErrors]
          action:
            type: MarkAsSuccess
- step:
    type: Run
    name: fatal
    identifier: fatal
    spec:
      command: exit 9
    failureStrategies:
      - onFailure:
          errors: [AllErrors]
          action:
            type: Abort
- step:
    type: Run
    name: cleanup
    identifier: cleanup
    when:
      stageStatus: All
    spec:
      command: echo cleaning
"#,
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(1).assert_stdout("retrying (attempt 3)");
        assert_eq!(
            std::fs::read_to_string(sb.workspace().join("count"))
                .unwrap()
                .trim(),
            "3"
        );
        assert!(r.summary_row("flaky").contains("passed"), "{}", r.all());
        assert!(
            r.summary_row("tolerated").contains("failed (ignored)"),
            "{}",
            r.all()
        );
        assert!(r.summary_row("fatal").contains("FAILED"), "{}", r.all());
        // Abort stops the stage: not even `when: All` steps run afterwards.
        assert!(r.summary_row("cleanup").contains("skipped"), "{}", r.all());
    }
}

#[test]
fn failure_skips_later_steps_but_runs_failure_handlers() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: broken
    identifier: broken
    spec:
      command: |
        false
        echo unreachable
- step:
    type: Run
    name: next
    identifier: next
    spec:
      command: echo next
- step:
    type: Run
    name: on failure
    identifier: on_failure
    when:
      stageStatus: Failure
    spec:
      command: echo collecting logs
"#,
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        // `set -e`: the script stops at `false`, as Harness runs Sh commands.
        r.assert_code(1).assert_stdout("collecting logs");
        assert!(!r.stdout.contains("unreachable"), "{}", r.all());
        assert!(r.summary_row("next").contains("skipped"), "{}", r.all());
        assert!(
            r.summary_row("broken").contains("exit code 1") || r.stdout.contains("exit code 1")
        );
    }
}

#[test]
fn junit_reports_are_counted_and_merged() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: tests
    identifier: tests
    spec:
      command: |
        mkdir -p reports
        printf '<testsuite name="a"><testcase name="x"/><testcase name="y"><failure message="no"/></testcase></testsuite>' > reports/a.xml
        printf '<testsuites><testsuite name="b"><testcase name="z"/></testsuite></testsuites>' > reports/b.xml
        printf 'not xml at all' > reports/broken.xml
      reports:
        type: JUnit
        spec:
          paths:
            - reports/*.xml
"#,
            ),
        );
        let out = sb.dir.path().join("out");
        let r = sb.run(["run", "ci.yaml", "--report-dir", out.to_str().unwrap()]);
        r.assert_code(0).assert_stdout("broken.xml ignored");
        assert!(
            r.summary_row("tests").contains("2 passed, 1 failed"),
            "{}",
            r.all()
        );
        let merged = std::fs::read_to_string(out.join("junit.xml")).unwrap();
        assert!(merged.contains(r#"tests="3" failures="1""#), "{merged}");
        assert!(merged.contains(r#"<testsuite name="b""#), "{merged}");
    }
}

/// A host step that links its output-variable file and its reports to a file outside
/// the workspace gets nothing of it through sandrun (the runner reads them inside the
/// control directory and the workspace, never following a link out).
#[test]
fn output_and_report_symlinks_are_not_followed_out() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let secret = support::plant_secret(&sb);
        sb.write(
            "ci.yaml",
            &stage(&support::symlink_leak_steps(None, &secret)),
        );
        support::assert_symlinks_do_not_leak(&sb);
    }
}

/// A multi-line secret (a PEM key) is masked line by line wherever sandrun writes: its
/// lines printed one by one, `--json`, and the merged JUnit file (read when the step
/// ended, never again), in which a file two steps report appears once.
#[test]
fn every_line_of_a_multi_line_secret_is_masked_in_output_json_and_junit() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: leak
    identifier: leak
    spec:
      command: |
        key="<+secrets.getValue("pem")>"
        printf '%s\n' "$key" | sed -n 2p
        printf '%s\n' "$key" | sed -n 3p >&2
        printf '<testsuite name="a"><testcase name="x"><failure message="m">%s</failure></testcase></testsuite>' "$key" > r.xml
      reports:
        type: JUnit
        spec:
          paths:
            - r.xml
- step:
    type: Run
    name: again
    identifier: again
    spec:
      command: "true"
      reports:
        type: JUnit
        spec:
          paths:
            - "*.xml"
"#,
            ),
        );
        let pem = "pem=-----BEGIN TEST KEY-----\nAAAAsecretline1\nBBBBsecretline2\n-----END TEST KEY-----";
        for json in [false, true] {
            let out = sb.dir.path().join(format!("out-{json}"));
            let mut args = vec!["run", "ci.yaml", "--secret", pem, "--report-dir"];
            args.push(out.to_str().unwrap());
            if json {
                args.push("--json");
            }
            let r = sb.run(&args);
            r.assert_code(0);
            assert!(!r.all().contains("secretline"), "{}", r.all());
            assert!(r.all().contains("**************"), "{}", r.all());
            let merged = std::fs::read_to_string(out.join("junit.xml")).unwrap();
            assert!(!merged.contains("secretline"), "{merged}");
            assert_eq!(merged.matches("<testcase ").count(), 1, "{merged}");
        }
    }
}

#[test]
fn secrets_never_appear_in_output() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &support::stage_with_variables(
                &[("DB_PASSWORD", "Secret", "db_pw")],
                "",
                r#"- step:
    type: Run
    name: leak
    identifier: leak
    spec:
      command: |
        echo "env: $DB_PASSWORD"
        echo "expr: <+secrets.getValue("api_key")>"
"#,
            ),
        );
        for json in [false, true] {
            let mut args = vec![
                "run",
                "ci.yaml",
                "--secret",
                "db_pw=hunter2-pw",
                "--secret",
                "api_key=k3y-v4lue",
            ];
            if json {
                args.push("--json");
            }
            let r = sb.run(&args);
            r.assert_code(0);
            assert!(
                !r.stdout.contains("hunter2-pw") && !r.stdout.contains("k3y-v4lue"),
                "{}",
                r.all()
            );
            assert!(r.stdout.contains("env: **************"), "{}", r.all());
        }
        let plan = sb.run([
            "plan",
            "ci.yaml",
            "--secret",
            "db_pw=hunter2-pw",
            "--secret",
            "api_key=k3y-v4lue",
        ]);
        plan.assert_code(0);
        assert!(
            !plan.stdout.contains("hunter2-pw") && !plan.stdout.contains("k3y-v4lue"),
            "{}",
            plan.all()
        );
    }
}

#[test]
fn ctrl_c_stops_every_step_and_exits_130() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let port = free_port();
        let service = format!("http.server {port}");
        let long = format!("sleep 4{port}");
        sb.write(
            "ci.yaml",
            &stage(&format!(
                r#"- step:
    type: Background
    name: svc
    identifier: svc
    spec:
      command: exec python3 -m http.server {port}
      portBindings:
        "{port}": "{port}"
- step:
    type: Run
    name: long
    identifier: long
    spec:
      command: {long}
"#
            )),
        );
        let child = spawn_until(&sb, &["run", "ci.yaml", "--grace", "2s"], &long);
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
        let r = support::Run::from(child.wait_with_output().unwrap());
        r.assert_code(130).assert_stdout("interrupted");
        assert!(r.summary_row("long").contains("cancelled"), "{}", r.all());
        for m in [&service, &long] {
            assert_no_process(m);
        }
    }
}

#[test]
fn json_stream_has_one_event_per_line() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage("- step:\n    type: Run\n    name: hi\n    identifier: hi\n    spec:\n      command: echo hi\n"),
        );
        let r = sb.run(["run", "ci.yaml", "--json"]);
        r.assert_code(0);
        let events: Vec<serde_json::Value> = r
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "stage_started",
                "step_started",
                "output",
                "step_exited",
                "step_finished",
                "stage_finished"
            ]
        );
        assert_eq!(events[2]["line"], "hi");
        assert_eq!(events[4]["result"]["result"], "succeeded");
    }
}

#[test]
fn unsupported_steps_are_refused_or_skipped_by_choice() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: hi
    identifier: hi
    spec:
      command: echo hi > ran
- step:
    type: BuildAndPushDockerRegistry
    name: push
    identifier: push
    spec:
      connectorRef: account.docker
      repo: me/app
      tags: [latest]
"#,
            ),
        );
        let v = sb.run(["validate", "ci.yaml"]);
        v.assert_code(1)
            .assert_stderr("ci.yaml:")
            .assert_stderr("`push`");
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(2).assert_stderr("--skip-unsupported");
        assert!(
            !sb.workspace().join("ran").exists(),
            "a step ran before the refusal"
        );
        let r = sb.run(["run", "ci.yaml", "--skip-unsupported"]);
        r.assert_code(0);
        let row = r.summary_row("push");
        // The step keeps its own type name, in the summary as in the plan.
        assert!(
            row.contains("skipped") && row.contains("BuildAndPushDockerRegistry"),
            "{}",
            r.all()
        );
        // ... and the columns stay aligned around the long name.
        let header = r.stdout.lines().find(|l| l.contains("RESULT")).unwrap();
        assert_eq!(
            header.find("RESULT"),
            row.find("skipped"),
            "{header}\n{row}"
        );
        sb.run(["plan", "ci.yaml"])
            .assert_stdout("BuildAndPushDockerRegistry `push`");
    }
}

#[test]
fn runtime_inputs_must_be_answered() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &support::stage_with_variables(
                &[("target", "String", "<+input>")],
                "",
                r#"- step:
    type: Run
    name: show
    identifier: show
    spec:
      command: echo "target=$target stage=<+stage.variables.target>"
"#,
            ),
        );
        sb.run(["run", "ci.yaml"])
            .assert_code(2)
            .assert_stderr("ci.yaml:")
            .assert_stderr("--set target=VALUE");
        sb.run(["run", "ci.yaml", "--set", "target=prod"])
            .assert_code(0)
            .assert_stdout("target=prod stage=prod");
    }
}

#[test]
fn default_pipeline_comes_from_dot_harness() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            ".harness/only.yaml",
            &stage("- step:\n    type: Run\n    name: hi\n    identifier: hi\n    spec:\n      command: echo found it\n"),
        );
        sb.run(["run"]).assert_code(0).assert_stdout("found it");
        sb.write(".harness/second.yml", "stage: {}\n");
        sb.run(["run"])
            .assert_code(2)
            .assert_stderr("several pipelines")
            .assert_stderr("second.yml");
    }
}

#[test]
fn a_second_ctrl_c_kills_at_once_and_still_leaves_nothing() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let stubborn = format!("sleep 5{}", free_port());
        sb.write(
            "ci.yaml",
            &stage(&format!(
                "- step:\n    type: Run\n    name: stubborn\n    identifier: stubborn\n    spec:\n      command: trap '' TERM INT; {stubborn}\n"
            )),
        );
        let started = Instant::now();
        let child = spawn_until(&sb, &["run", "ci.yaml", "--grace", "60s"], &stubborn);
        let pid = Pid::from_raw(child.id() as i32);
        kill(pid, Signal::SIGINT).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        kill(pid, Signal::SIGINT).unwrap();
        let r = support::Run::from(child.wait_with_output().unwrap());
        r.assert_code(130).assert_stdout("interrupted again");
        // Well inside the 60 s grace period: the second Ctrl-C did not wait for it.
        assert!(started.elapsed() < Duration::from_secs(30), "{}", r.all());
        assert_no_process(&stubborn);
    }
}

#[test]
fn readiness_is_bounded_and_the_stage_proceeds_when_it_expires() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let port = free_port();
        sb.write(
            "ci.yaml",
            &stage(&format!(
                "- step:\n    type: Background\n    name: mute\n    identifier: mute\n    spec:\n      command: sleep 30\n      portBindings:\n        \"{port}\": \"{port}\"\n- step:\n    type: Run\n    name: next\n    identifier: next\n    spec:\n      command: echo went on\n"
            )),
        );
        let started = Instant::now();
        let r = sb.run(["run", "ci.yaml", "--ready-timeout", "1s", "--grace", "1s"]);
        r.assert_code(0)
            .assert_stdout(&format!("port {port} not accepting connections after"))
            .assert_stdout("went on");
        assert!(started.elapsed() < Duration::from_secs(20), "{}", r.all());
    }
}

#[test]
fn when_conditions_read_variables_and_step_outputs() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &support::stage_with_variables(&[("target", "String", "staging")], "", r#"- step:
    type: Run
    name: decide
    identifier: decide
    spec:
      command: GO=yes
      outputVariables:
        - name: GO
- step:
    type: Run
    name: deploy
    identifier: deploy
    when:
      stageStatus: Success
      condition: <+steps.decide.output.outputVariables.GO> == "yes" && <+stage.variables.target> != "prod"
    spec:
      command: echo deploying
- step:
    type: Run
    name: prod only
    identifier: prod_only
    when:
      stageStatus: Success
      condition: <+stage.variables.target> == "prod"
    spec:
      command: echo should not run
"#),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0).assert_stdout("deploying");
        assert!(
            r.summary_row("prod_only").contains("skipped"),
            "{}",
            r.all()
        );
        assert!(!r.stdout.contains("should not run\n"), "{}", r.all());
    }
}

#[test]
fn host_steps_get_their_own_pid_and_uts_namespaces_as_the_invoking_user() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                "- step:\n    type: Run\n    name: where\n    identifier: where_am_i\n    spec:\n      command: |\n        echo \"host=$(hostname) pid=$$ procs=$(ls /proc | grep -c '^[0-9]') uid=$(id -u)\"\n",
            ),
        );
        let uid = sb.uid();
        // PID 1 is sandrun's init, the script is PID 2; /proc shows only the step's
        // processes (init, sh, the command substitution's subshell, ls, grep).
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("host=where_am_i pid=2 procs=")
            .assert_stdout(&format!(" uid={uid}"));
        let procs: u32 = r
            .stdout
            .split("procs=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(procs <= 6, "the step sees {procs} processes\n{}", r.all());
    }
}

#[test]
fn host_steps_see_the_host_read_only_but_workspace_and_scratch() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        // A directory outside the workspace and /tmp that the step's user owns.
        let outside = std::path::PathBuf::from(format!("/var/tmp/sandrun-ro-{}", free_port()));
        let probe = tempfile::Builder::new()
            .prefix("sandrun-ro-")
            .tempdir_in("/var/lib")
            .unwrap();
        if let (support::Mode::Rootless, true) = (mode, support::is_root()) {
            let (uid, gid) = support::test_user().unwrap();
            nix::unistd::chown(probe.path(), Some(uid.into()), Some(gid.into())).unwrap();
        }
        let p = probe.path().display();
        sb.write(
            "ci.yaml",
            &stage(&format!(
                "- step:\n    type: Run\n    name: w\n    identifier: w\n    spec:\n      command: |\n        touch in-workspace && echo workspace writable\n        touch /tmp/x-$$ && rm /tmp/x-$$ && echo tmp writable\n        mkdir -p {o} && rmdir {o} && echo var-tmp writable\n        touch {p}/x 2>&1 || true\n",
                o = outside.display()
            )),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("workspace writable")
            .assert_stdout("tmp writable")
            .assert_stdout("var-tmp writable")
            .assert_stdout("Read-only file system");
        assert!(!probe.path().join("x").exists());
        let r = sb.run(["run", "ci.yaml", "--host-writable", &p.to_string()]);
        r.assert_code(0);
        assert!(!r.stdout.contains("Read-only file system"), "{}", r.all());
        assert!(probe.path().join("x").exists());
    }
}

#[test]
fn host_connections_to_a_bound_port_are_handed_to_a_host_step_service() {
    for mode in modes() {
        for handoff in [true, false] {
            if handoff && support::handoff_unsupported() {
                continue;
            }
            let sb = Sandbox::new(mode);
            let host_port = free_port();
            let tag = free_port();
            let big: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(sb.workspace().join("big"), &big).unwrap();
            // python's http.server: an IPv4 listener, accept(2) after select(2); it logs
            // each request's peer address.
            sb.write(
                "ci.yaml",
                &service_and_hold(
                    "exec python3 -m http.server 8000 --bind 0.0.0.0",
                    host_port,
                    "curl -sf http://svc:8000/ >/dev/null",
                    tag,
                ),
            );
            let handoff_env = if handoff { "on" } else { "off" };
            let child = support::spawn_with_until(
                &sb,
                &["run", "ci.yaml"],
                &[("SANDRUN_PORT_HANDOFF", handoff_env)],
                &format!("wait{tag}"),
            );
            let got = support::http_get(host_port, "/big");
            std::fs::write(sb.workspace().join("done"), "").unwrap();
            let r = child.finish();
            r.assert_code(0);
            assert!(got == big, "the 4 MiB body arrived changed\n{}", r.all());
            let all = r.all();
            let served: Vec<&str> = all.lines().filter(|l| l.contains("\"GET /big")).collect();
            assert_eq!(served.len(), 1, "{}", r.all());
            if handoff {
                // The service talked to the host's client itself.
                assert!(served[0].contains("| 127.0.0.1 - -"), "{}", r.all());
            } else {
                // Proxied: the connection came from inside the stage network.
                assert!(served[0].contains("| 10."), "{}", r.all());
            }
        }
    }
}

#[test]
fn an_asyncio_service_takes_host_connections_through_its_non_blocking_listener() {
    for mode in modes() {
        for (network, handoff) in [
            ("bridge", true),
            ("bridge", false),
            ("pod", true),
            ("pod", false),
        ] {
            if handoff && support::handoff_unsupported() {
                continue;
            }
            let sb = Sandbox::new(mode);
            let host_port = free_port();
            let tag = free_port();
            // asyncio: a non-blocking listener, epoll, accept(2) until EAGAIN.
            sb.write(
                "serve.py",
                "import asyncio\n\
                 async def handle(r, w):\n\
                 \x20   await r.read(1)\n\
                 \x20   peer = w.get_extra_info('peername')[0]\n\
                 \x20   port = w.get_extra_info('sockname')[1]\n\
                 \x20   w.write(f\"peer={peer} port={port}\\n\".encode())\n\
                 \x20   await w.drain()\n\
                 \x20   w.close()\n\
                 async def main():\n\
                 \x20   s = await asyncio.start_server(handle, '0.0.0.0', 8000)\n\
                 \x20   await s.serve_forever()\n\
                 asyncio.run(main())\n",
            );
            sb.write(
                "ci.yaml",
                &service_and_hold("exec python3 serve.py", host_port, "true", tag),
            );
            let handoff_env = if handoff { "on" } else { "off" };
            let child = support::spawn_with_until(
                &sb,
                &["run", "ci.yaml", "--network", network],
                &[("SANDRUN_PORT_HANDOFF", handoff_env)],
                &format!("wait{tag}"),
            );
            // Several connections at once: each one is answered.
            let conns: Vec<std::net::TcpStream> = (0..5)
                .map(|_| std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap())
                .collect();
            let answers: Vec<String> = conns
                .into_iter()
                .map(|mut c| {
                    use std::io::{Read, Write};
                    c.write_all(b"x").unwrap();
                    let mut s = String::new();
                    c.read_to_string(&mut s).unwrap();
                    s
                })
                .collect();
            std::fs::write(sb.workspace().join("done"), "").unwrap();
            let r = child.finish();
            r.assert_code(0);
            for a in &answers {
                if handoff {
                    // The host's own connection: the client's address, the host port.
                    assert_eq!(
                        a.trim(),
                        format!("peer=127.0.0.1 port={host_port}"),
                        "{network}\n{}",
                        r.all()
                    );
                } else if network == "bridge" {
                    // Proxied from the step's own namespace to its stage address.
                    assert!(
                        a.starts_with("peer=10.") && a.trim().ends_with(" port=8000"),
                        "{a}\n{}",
                        r.all()
                    );
                } else {
                    // Proxied over the pod namespace's loopback.
                    assert_eq!(a.trim(), "peer=127.0.0.1 port=8000", "{}", r.all());
                }
            }
        }
    }
}

#[test]
fn a_signal_during_a_blocking_accept_loses_no_host_connection() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if support::handoff_unsupported() {
        return;
    }
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let host_port = free_port();
        let tag = free_port();
        // A blocking accept(2) with a SIGUSR1 handler: each signal withdraws the call
        // the runner is answering, and python makes it again (PEP 475).
        sb.write(
            &format!("blocking{tag}.py"),
            &[
                PY_LISTEN_8000,
                "import signal\n\
             signal.signal(signal.SIGUSR1, lambda *a: None)\n\
             s.listen()\n\
             while True:\n\
             \x20   c, a = s.accept()\n\
             \x20   c.sendall(f'peer={a[0]} port={c.getsockname()[1]}\\n'.encode())\n\
             \x20   c.close()\n",
            ]
            .concat(),
        );
        sb.write(
            "ci.yaml",
            &service_and_hold(
                &format!("exec python3 blocking{tag}.py"),
                host_port,
                "true",
                tag,
            ),
        );
        let child = support::spawn_with_until(&sb, &["run", "ci.yaml"], &[], &format!("wait{tag}"));
        // The process that handles SIGUSR1 (python may run under a pyenv shim).
        let handles_usr1 = |pid: &str| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & (1 << (libc::SIGUSR1 - 1)) != 0)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let service: i32 = loop {
            let found = support::processes_with(&format!("blocking{tag}.py"))
                .iter()
                .filter_map(|p| p.split_once(": ").map(|(pid, _)| pid.to_string()))
                .find(|pid| handles_usr1(pid));
            if let Some(pid) = found {
                break pid.parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no python with a SIGUSR1 handler"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            kill(Pid::from_raw(service), Signal::SIGUSR1).unwrap();
        }
        let started = Instant::now();
        let mut answers = Vec::new();
        for _ in 0..3 {
            use std::io::Read;
            let mut c = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            answers.push(s);
            kill(Pid::from_raw(service), Signal::SIGUSR1).unwrap();
        }
        let took = started.elapsed();
        std::fs::write(sb.workspace().join("done"), "").unwrap();
        let r = child.finish();
        r.assert_code(0);
        for a in &answers {
            assert_eq!(
                a.trim(),
                format!("peer=127.0.0.1 port={host_port}"),
                "{}",
                r.all()
            );
        }
        // Handed over, not proxied after the 1 s claim timeout.
        assert!(took < Duration::from_secs(2), "took {took:?}\n{}", r.all());
    }
}

#[test]
fn a_host_connection_the_service_is_slow_to_accept_is_proxied_after_a_second() {
    if support::handoff_unsupported() {
        return;
    }
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let host_port = free_port();
        let tag = free_port();
        // Listens at once, accepts only after 2.5 s: longer than the hand-off waits.
        sb.write(
            &format!("slow{tag}.py"),
            &[
                PY_LISTEN_8000,
                "import time\n\
             s.listen(16)\n\
             time.sleep(2.5)\n\
             while True:\n\
             \x20   c, a = s.accept()\n\
             \x20   if c.recv(1):\n\
             \x20       c.sendall(f'peer={a[0]} port={c.getsockname()[1]}\\n'.encode())\n\
             \x20   c.close()\n",
            ]
            .concat(),
        );
        sb.write(
            "ci.yaml",
            &service_and_hold(
                &format!("exec python3 slow{tag}.py"),
                host_port,
                "true",
                tag,
            ),
        );
        let child = support::spawn_with_until(&sb, &["run", "ci.yaml"], &[], &format!("wait{tag}"));
        use std::io::{Read, Write};
        let started = Instant::now();
        let mut c = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        c.write_all(b"x").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        let took = started.elapsed();
        std::fs::write(sb.workspace().join("done"), "").unwrap();
        let r = child.finish();
        r.assert_code(0);
        // Proxied to its placeholder, which the service then accepted as it came.
        assert!(
            answer.starts_with("peer=10.") && answer.trim().ends_with(" port=8000"),
            "{answer}\n{}",
            r.all()
        );
        assert!(took < Duration::from_secs(8), "took {took:?}");
    }
}

/// What a SIGKILLed run left in the state base (its overlay upper directories, in
/// /dev/shm: RAM) is removed by the next sandrun command of any kind, not only by the
/// next run; rootless too, where it holds files of other ids of the user namespace.
#[test]
fn any_command_sweeps_a_killed_runs_state() {
    use std::os::unix::fs::PermissionsExt;
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("ci.yaml", &stage("- step:\n    type: Run\n    name: hi\n    identifier: hi\n    spec:\n      command: echo hi\n"));
        // A first run makes the state base as sandrun makes it.
        sb.run(["run", "ci.yaml"]).assert_code(0);
        let base = sandrun::sandbox::state::default_base_for(sb.uid());
        // A killed run's directory: a lock nobody holds, and an upper directory with a
        // directory of the image's user 999 (a subordinate id rootless), private to it.
        let stale = base.join(format!("run-killed{}", free_port()));
        let data = stale.join("containers/x/upper/var/lib/data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(stale.join("lock"), "").unwrap();
        std::fs::write(data.join("file"), "x".repeat(4096)).unwrap();
        let (owner, image_user) = match support::test_user() {
            Some((uid, gid)) if mode == support::Mode::Rootless => {
                let sub = support::subordinate_id(support::TEST_USER)
                    .expect("a subuid range for the test user");
                ((uid, gid), sub + 998)
            }
            _ => ((0, 0), 999),
        };
        let chown = |p: &std::path::Path, id: (u32, u32)| {
            std::os::unix::fs::lchown(p, Some(id.0), Some(id.1)).unwrap()
        };
        for p in [
            &stale,
            &stale.join("lock"),
            &stale.join("containers"),
            &stale.join("containers/x"),
            &stale.join("containers/x/upper"),
            &stale.join("containers/x/upper/var"),
            &stale.join("containers/x/upper/var/lib"),
        ] {
            chown(p, owner);
        }
        chown(&data.join("file"), (image_user, image_user));
        chown(&data, (image_user, image_user));
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();

        sb.run(["validate", "ci.yaml"]).assert_code(0);
        assert!(
            !stale.exists(),
            "`sandrun validate` left {}",
            stale.display()
        );
    }
}

/// Host steps see the host's filesystem, where sandrun creates nothing: a shared path
/// that is not a directory on this machine is not shared with them, and `plan` says so
/// instead of leaving it to be found out.
#[test]
fn plan_says_host_steps_do_not_get_missing_shared_paths() {
    let sb = Sandbox::new(modes()[0]);
    sb.write(
        "ci.yaml",
        &support::stage(
            "    sharedPaths:\n      - /shared/sandrun-nowhere\n",
            "- step:\n    type: Run\n    name: on host\n    identifier: on_host\n    spec:\n      command: ls /shared/sandrun-nowhere\n",
        ),
    );
    sb.run(["plan", "ci.yaml"]).assert_code(0).assert_stdout(
        "`sharedPaths` /shared/sandrun-nowhere are not directories on this machine, so its host steps (on_host) do not share them",
    );
}

/// `sharedPaths` that are directories on the machine are shared by host steps too: the
/// stage's own directory is bound over the host's for each step, so what one step
/// writes there the next reads, and the host's directory is left as it was.
#[test]
fn host_steps_share_shared_paths() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let host_dir = sb.dir.path().join("host-shared");
        std::fs::create_dir(&host_dir).unwrap();
        std::fs::write(host_dir.join("host-file"), "the host's own\n").unwrap();
        let dir = host_dir.display();
        sb.write(
            "ci.yaml",
            &support::stage(
                &format!("    sharedPaths:\n      - {dir}\n"),
                &format!(
                    "- step:\n    type: Run\n    name: write\n    identifier: write\n    spec:\n      shell: Sh\n      command: echo from-write > {dir}/note; ls {dir}\n- step:\n    type: Run\n    name: read\n    identifier: read\n    spec:\n      shell: Sh\n      command: |\n        echo \"read: $(cat {dir}/note)\"\n"
                ),
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0).assert_stdout("read: from-write");
        assert!(
            !r.all().contains("host-file"),
            "the step saw the host's directory: {}",
            r.all()
        );
        let left: Vec<_> = std::fs::read_dir(&host_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("host-file")],
            "the host's directory changed"
        );
    }
}

/// Harness's VM runner: host steps run side by side on the build machine. A Background
/// host step answers later host steps at `localhost:PORT` and by its identifier; what a
/// step leaves running (`cmd &`, even holding the step's output) serves later steps and
/// lives until the stage ends, when it gets SIGTERM, and nothing is left behind.
#[test]
fn host_steps_share_the_machine_and_their_daemons_live_until_the_stage_ends() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let (svc, daemon) = (free_port(), free_port());
        sb.write("index.html", "hello from the machine\n");
        let linger = format!("linger{daemon}");
        sb.write(
            "ci.yaml",
            &stage(&format!(
                r#"- step:
    type: Background
    name: svc
    identifier: svc
    spec:
      shell: Sh
      command: exec python3 -m http.server {svc}
- step:
    type: Run
    name: start
    identifier: start
    spec:
      shell: Sh
      command: |
        python3 -m http.server {daemon} >/dev/null 2>&1 &
        sh -c 'trap "echo term > stopped-by-term; exit 0" TERM; while :; do sleep 0.1; done # {linger}' &
        echo started
- step:
    type: Run
    name: use
    identifier: use
    spec:
      shell: Sh
      command: |
        get() {{ for i in $(seq 100); do curl -sf "$1" && return 0; sleep 0.1; done; return 1; }}
        echo "daemon: $(get http://localhost:{daemon}/index.html)"
        echo "service: $(get http://localhost:{svc}/index.html)"
        echo "by name: $(get http://svc:{svc}/index.html)"
"#
            )),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("daemon: hello from the machine")
            .assert_stdout("service: hello from the machine")
            .assert_stdout("by name: hello from the machine")
            .assert_stdout("left processes running");
        assert!(r.summary_row("start").contains("passed"), "{}", r.all());
        assert!(
            !r.all().contains("use   | warning: left processes running"),
            "a step that left nothing running was said to: {}",
            r.all()
        );
        assert_eq!(
            std::fs::read_to_string(sb.workspace().join("stopped-by-term"))
                .ok()
                .as_deref(),
            Some("term\n"),
            "the daemon was not stopped with SIGTERM: {}",
            r.all()
        );
        assert_no_process(&format!("http.server {daemon}"));
        assert_no_process(&linger);
        assert_no_process(&format!("http.server {svc}"));
    }
}

/// A Background host step whose command daemonizes (starts its server and ends well)
/// is a service all the same: what it started serves later steps until the stage ends,
/// the stage does not call it dead, and it is stopped at the end.
#[test]
fn a_daemonizing_host_service_serves_until_the_stage_ends() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let port = free_port();
        sb.write("index.html", "hello from the daemon\n");
        sb.write(
            "ci.yaml",
            &stage(&format!(
                r#"- step:
    type: Background
    name: daemon
    identifier: daemon
    spec:
      shell: Sh
      command: python3 -m http.server {port} >/dev/null 2>&1 &
- step:
    type: Run
    name: use
    identifier: use
    spec:
      shell: Sh
      command: |
        for i in $(seq 100); do curl -sf http://localhost:{port}/index.html && break; sleep 0.1; done
        echo "checked again: $(curl -sf http://daemon:{port}/index.html)"
"#
            )),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("checked again: hello from the daemon")
            .assert_stdout("they serve until the stage ends");
        assert!(r.summary_row("daemon").contains("stopped"), "{}", r.all());
        assert!(!r.all().contains("service ended"), "{}", r.all());
        assert_no_process(&format!("http.server {port}"));
    }
}
