//! Looping strategies end to end: the real binary runs every instance of a matrix,
//! `parallelism` or `repeat` as a step (or group, or stage) of its own, with host steps.
//! Concurrency is asserted through files the steps write, never through timing.

mod prereq;
mod support;

use support::{modes, testdata, Sandbox};

fn stage(steps: &str) -> String {
    support::stage(support::DOCKER, steps)
}

/// Four instances, at most two at once: each pair waits (bounded) for its partner to
/// start, so a cap of one would fail; each records how many instances were running
/// when its partner had started, so a missing cap shows up as more than two.
#[test]
fn matrix_max_concurrency_caps_the_instances_running_at_once() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: work
    identifier: work
    strategy:
      matrix:
        a: [x, y]
        b: [1, 2]
        maxConcurrency: 2
    spec:
      shell: Sh
      command: |
        I=<+strategy.iteration>
        mkdir -p started running seen
        touch started/$I running/$I
        P=$((I ^ 1))
        n=0
        while [ ! -e started/$P ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done
        [ -e started/$P ] || { echo "partner $P never started"; exit 1; }
        ls running | wc -l > seen/$I
        sleep 0.2
        rm running/$I
        echo "ran <+matrix.a><+matrix.b> as <+strategy.identifierPostFix>"
"#,
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("ran x1 as _0_0")
            .assert_stdout("ran y2 as _1_1");
        for id in ["work_0_0", "work_0_1", "work_1_0", "work_1_1"] {
            assert!(r.summary_row(id).contains("passed"), "{}", r.all());
        }
        for i in 0..4 {
            let seen = std::fs::read_to_string(sb.workspace().join(format!("seen/{i}"))).unwrap();
            let n: usize = seen.trim().parse().unwrap();
            assert!(
                (1..=2).contains(&n),
                "instance {i} saw {n} running\n{}",
                r.all()
            );
        }
    }
}

#[test]
fn matrix_exclude_and_node_name_name_the_instances() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: build
    identifier: build
    strategy:
      matrix:
        os: [linux, mac]
        tool: [go, rust]
        target:
          - {arch: amd64, libc: gnu}
        exclude:
          - os: mac
            tool: rust
        nodeName: <+matrix.os>-<+matrix.tool>
    spec:
      shell: Sh
      command: |
        mkdir -p out
        echo "<+matrix.tool> for <+matrix.target.arch>" > out/<+matrix.os>-<+matrix.tool>
        echo "name <+step.name> id <+step.identifier>"
      outputVariables:
        - name: BUILT
- step:
    type: Run
    name: report
    identifier: report
    spec:
      shell: Sh
      command: echo "after <+steps.build_mac_go.output.outputVariables.BUILT>"
"#,
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("name linux-rust id build_linux_rust");
        for id in ["build_linux_go", "build_linux_rust", "build_mac_go"] {
            assert!(r.summary_row(id).contains("passed"), "{}", r.all());
        }
        assert!(!r.stdout.contains("build_mac_rust"), "{}", r.all());
        let ws = sb.workspace();
        assert_eq!(
            std::fs::read_to_string(ws.join("out/linux-rust")).unwrap(),
            "rust for amd64\n"
        );
        assert!(!ws.join("out/mac-rust").exists());
    }
}

#[test]
fn parallelism_gives_node_index_and_total_outputs_and_junit_per_instance() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Run
    name: shard
    identifier: shard
    strategy:
      parallelism: 3
    spec:
      shell: Sh
      command: |
        mkdir -p split reports
        touch split/$HARNESS_NODE_INDEX-of-$HARNESS_NODE_TOTAL
        printf '<testsuite name="s%s"><testcase name="t%s"/></testsuite>' $HARNESS_NODE_INDEX $HARNESS_NODE_INDEX > reports/shard-$HARNESS_NODE_INDEX.xml
        PART="part$HARNESS_NODE_INDEX"
      outputVariables:
        - name: PART
      reports:
        type: JUnit
        spec:
          paths:
            - reports/shard-<+strategy.iteration>.xml
- step:
    type: Run
    name: gather
    identifier: gather
    spec:
      shell: Sh
      command: echo "gathered <+steps.shard_0.output.outputVariables.PART> <+steps.shard_2.output.outputVariables.PART>"
"#,
            ),
        );
        let out = sb.dir.path().join("out");
        let r = sb.run(["run", "ci.yaml", "--report-dir", out.to_str().unwrap()]);
        r.assert_code(0).assert_stdout("gathered part0 part2");
        for i in 0..3 {
            assert!(
                sb.workspace().join(format!("split/{i}-of-3")).exists(),
                "{}",
                r.all()
            );
            let row = r.summary_row(&format!("shard_{i}"));
            assert!(row.contains("1 passed"), "{row}\n{}", r.all());
        }
        let merged = std::fs::read_to_string(out.join("junit.xml")).unwrap();
        assert!(merged.contains(r#"tests="3""#), "{merged}");
    }
}

#[test]
fn repeat_on_a_step_group_runs_each_item_in_order_with_max_concurrency_one() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                r#"- stepGroup:
    name: modules
    identifier: modules
    strategy:
      repeat:
        items: [api, core, web]
        maxConcurrency: 1
    steps:
      - step:
          type: Run
          name: compile
          identifier: compile
          spec:
            shell: Sh
            command: |
              mkdir -p lock
              mkdir lock/held || { echo "two instances at once"; exit 1; }
              echo "<+repeat.item>" >> order.txt
              sleep 0.1
              MODULE="<+repeat.item>"
            outputVariables:
              - name: MODULE
      - step:
          type: Run
          name: test
          identifier: test
          spec:
            shell: Sh
            command: |
              echo "tested <+steps.compile.output.outputVariables.MODULE> $HARNESS_STEP_INDEX/$HARNESS_STEP_TOTAL"
              rmdir lock/held
"#,
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("tested core 1/3")
            .assert_stdout("tested web 2/3");
        assert_eq!(
            std::fs::read_to_string(sb.workspace().join("order.txt")).unwrap(),
            "api\ncore\nweb\n"
        );
        for key in ["modules_0.compile", "modules_2.test"] {
            assert!(r.summary_row(key).contains("passed"), "{}", r.all());
        }
    }
}

#[test]
fn a_stage_strategy_makes_stages_of_their_own() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            r#"pipeline:
  identifier: p
  name: p
  stages:
    - stage:
        identifier: build
        name: build
        type: CI
        strategy:
          matrix:
            jdk: ["17", "21"]
        spec:
          runtime:
            type: Docker
            spec: {}
          execution:
            steps:
              - step:
                  type: Run
                  name: compile
                  identifier: compile
                  spec:
                    shell: Sh
                    command: |
                      mkdir -p stages
                      echo "jdk <+matrix.jdk> index $HARNESS_STAGE_INDEX of $HARNESS_STAGE_TOTAL" > stages/<+stage.identifier>
    - stage:
        identifier: after
        name: after
        type: CI
        spec:
          runtime:
            type: Docker
            spec: {}
          execution:
            steps:
              - step:
                  type: Run
                  name: list
                  identifier: list
                  spec:
                    shell: Sh
                    command: ls stages
"#,
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0);
        let ws = sb.workspace();
        assert_eq!(
            std::fs::read_to_string(ws.join("stages/build_0")).unwrap(),
            "jdk 17 index 0 of 2\n"
        );
        assert_eq!(
            std::fs::read_to_string(ws.join("stages/build_1")).unwrap(),
            "jdk 21 index 1 of 2\n"
        );
        // `--stage` with the identifier as written selects every instance.
        std::fs::remove_dir_all(ws.join("stages")).unwrap();
        let r = sb.run(["plan", "ci.yaml", "--stage", "build"]);
        r.assert_code(0)
            .assert_stdout("Stage `build_0`")
            .assert_stdout("Stage `build_1`")
            .assert_stdout("instance 2 of 2 of matrix `build`");
        assert!(!r.stdout.contains("Stage `after`"), "{}", r.all());
    }
}

/// Three stage instances, at most two at once: the first two overlap, the third
/// starts only once one of them has ended (the pipeline's steps check both).
#[test]
fn stage_matrix_max_concurrency_caps_the_stages_running_at_once() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("ci.yaml", &testdata("stage-matrix-max-concurrency.yaml"));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("built amd64 as build_0")
            .assert_stdout("built riscv64 as build_2");
        let seen = |i: usize| -> usize {
            let path = sb.workspace().join(format!("marks/seen/{i}"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), r.all()));
            text.trim().parse().unwrap()
        };
        for i in 0..3 {
            assert!((1..=2).contains(&seen(i)), "instance {i}\n{}", r.all());
        }
        sb.run(["plan", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("instance 3 of 3 of matrix `build` (at most 2 at once)");
    }
}

#[test]
fn plan_shows_the_instances_of_the_corpus_examples() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines");
    let out = std::process::Command::new(support::binary())
        .arg("plan")
        .arg(dir.join("matrix-browsers.yaml"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("matrix `run_tests`: 5 instances, at most 2 at once"),
        "{stdout}"
    );
    assert!(stdout.contains("`run_tests_chrome_macos`"), "{stdout}");
    assert!(!stdout.contains("safari_linux"), "{stdout}");
    assert!(
        stdout.contains("Testing app in firefox on linux (3 of 5)"),
        "{stdout}"
    );
}

#[test]
fn strategy_mistakes_are_named_with_their_line() {
    let sb = Sandbox::new(support::Mode::Root);
    sb.write(
        "ci.yaml",
        &stage(
            r#"- step:
    type: Run
    name: t
    identifier: t
    strategy:
      matrix:
        os: [linux]
        exclude:
          - arch: arm
    spec:
      command: "true"
- step:
    type: Run
    name: u
    identifier: u
    strategy:
      repeat:
        times: <+steps.t.output.outputVariables.N>
    spec:
      command: "true"
"#,
        ),
    );
    let r = sb.run(["validate", "ci.yaml"]);
    r.assert_code(2)
        .assert_stderr("ci.yaml:19:21: `matrix.exclude` names axis `arch`")
        .assert_stderr("ci.yaml:28:24: `repeat.times` is `<+steps.t.output.outputVariables.N>`: the output of step `t` is only known while the run goes on");
}

/// Counts and lists given as expressions: pipeline and stage variables (split into
/// lists), an `<+input>` with its default, and `--set` answers to both.
#[test]
fn strategy_values_from_variables_and_answers_make_the_instances() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("ci.yaml", &testdata("strategy-expressions.yaml"));
        let r = sb.run([
            "run",
            "ci.yaml",
            "--set",
            "targets=amd64,arm64,riscv64",
            "--set",
            "lint.strategy.matrix.level=[1, 2]",
        ]);
        r.assert_code(0);
        let read = |f: &str| {
            std::fs::read_to_string(sb.workspace().join("out").join(f))
                .unwrap_or_else(|e| panic!("{f}: {e}\n{}", r.all()))
        };
        assert_eq!(read("build_2_test_1"), "riscv64 shard 1 of 2\n");
        assert_eq!(read("build_0_test_0"), "amd64 shard 0 of 2\n");
        assert_eq!(read("build_1_lint_1_1"), "arm64 lint rust level 2\n");
        assert_eq!(read("build_2_lint_0_0"), "riscv64 lint go level 1\n");
        // Without answers, the defaults: two targets, one level.
        let r = sb.run(["plan", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("instance 2 of 2 of repeat `build`")
            .assert_stdout("matrix `lint`: 2 instances")
            .assert_stdout("echo \"arm64 lint rust level 1\"");
        // An answer outside the input's allowed values is refused.
        let text = testdata("strategy-expressions.yaml")
            .replace("<+input>.default(\"[1]\")", "<+input>.allowedValues(1, 2)");
        sb.write("allowed.yaml", &text);
        sb.run([
            "plan",
            "allowed.yaml",
            "--set",
            "lint.strategy.matrix.level=3",
        ])
        .assert_code(2)
        .assert_stderr("`3` is not an allowed value of `lint.strategy.matrix.level`");
    }
}

/// What a strategy needs and that only a run could tell (or that nobody answered) is
/// refused before anything starts, at its line, with the reason; `validate` checks
/// the file and lets unanswered inputs stand in for one instance.
#[test]
fn strategy_values_not_known_before_the_run_are_refused() {
    let sb = Sandbox::new(modes()[0]);
    sb.write(
        "ci.yaml",
        &stage(
            r#"- step:
    type: Run
    name: count
    identifier: count
    spec:
      command: N=2
      outputVariables:
        - name: N
- step:
    type: Run
    name: t
    identifier: t
    strategy:
      parallelism: <+input>
    spec:
      command: echo <+trigger.branch>
"#,
        ),
    );
    sb.run(["validate", "ci.yaml"])
        .assert_code(0)
        .assert_stdout("inputs looping strategies need (one instance stands in for each here):\n  ci.yaml:24:28: `parallelism` is `<+input>`");
    // Asked for together with every other unanswered input, before anything starts.
    sb.run(["run", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("ci.yaml:24:28: `parallelism` is `<+input>`: it is a runtime input: answer it with --set t.strategy.parallelism=VALUE")
        .assert_stderr("`<+trigger.branch>` is known only to Harness's server");
    sb.run([
        "plan",
        "ci.yaml",
        "--set",
        "t.strategy.parallelism=3",
        "--set",
        "trigger.branch=main",
    ])
    .assert_code(0)
    .assert_stdout("parallelism `t`: 3 instances");
    let text = std::fs::read_to_string(sb.workspace().join("ci.yaml"))
        .unwrap()
        .replace("<+input>", "<+steps.count.output.outputVariables.N>");
    sb.write("ci.yaml", &text);
    sb.run(["validate", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("`parallelism` is `<+steps.count.output.outputVariables.N>`: the output of step `count` is only known while the run goes on");
    // A step's input inside a looped stage is asked for once, not once per instance.
    sb.write(
        "looped.yaml",
        r#"pipeline:
  identifier: p
  name: p
  stages:
    - stage:
        identifier: b
        name: b
        type: CI
        strategy:
          parallelism: 2
        spec:
          runtime:
            type: Docker
            spec: {}
          execution:
            steps:
              - step:
                  identifier: t
                  name: t
                  type: Run
                  strategy:
                    repeat:
                      times: <+input>
                  spec:
                    command: "true"
"#,
    );
    let r = sb.run(["plan", "looped.yaml"]);
    r.assert_code(2);
    assert_eq!(
        r.stderr.matches("t.strategy.repeat.times=VALUE").count(),
        1,
        "{}",
        r.all()
    );
    let v = sb.run(["validate", "looped.yaml"]);
    v.assert_code(0);
    assert_eq!(
        v.stdout.matches("t.strategy.repeat.times=VALUE").count(),
        1,
        "{}",
        v.all()
    );
}

/// Each instance of a looped Background step is a service of its own, reached by its
/// instance identifier (host steps share the build machine, as on Harness's VM runner,
/// so each instance listens on a port of its own).
#[test]
fn looped_services_are_reached_by_their_instance_names() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("srv0/who.txt", "instance zero\n");
        sb.write("srv1/who.txt", "instance one\n");
        sb.write(
            "ci.yaml",
            &stage(
                r#"- step:
    type: Background
    name: svc
    identifier: svc
    strategy:
      parallelism: 2
    spec:
      command: exec python3 -m http.server 800<+strategy.iteration> --directory srv<+strategy.iteration>
- step:
    type: Run
    name: client
    identifier: client
    spec:
      shell: Bash
      command: |
        for i in 0 1; do
          n=0
          until curl -sf http://svc_$i:800$i/who.txt; do
            n=$((n + 1)); [ $n -lt 100 ] || exit 1; sleep 0.1
          done
        done
"#,
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("| instance zero")
            .assert_stdout("| instance one");
    }
}
