//! End-to-end runs of whole pipelines: which stages run after a failure (stage
//! `when`), `parallel` stages, the pipeline's exit code. Host steps only, as root and
//! rootless.

mod prereq;
mod support;

use support::{modes, testdata, Sandbox};

fn timestamp(sb: &Sandbox, file: &str) -> u128 {
    let text = std::fs::read_to_string(sb.workspace().join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{file}: {e}: {text:?}"))
}

#[test]
fn stage_when_after_a_failure() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("ci.yaml", &testdata("stage-flow.yaml"));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(1)
            .assert_stdout("Stage `deploy` skipped: an earlier stage failed")
            .assert_stdout("Stage `notify` skipped: its condition is false")
            .assert_stdout("Stage `on_failure` succeeded")
            .assert_stdout("Stage `always` succeeded");
        let ws = sb.workspace();
        assert!(!ws.join("ran-deploy").exists(), "{}", r.all());
        assert!(ws.join("ran-on-failure").exists(), "{}", r.all());
        assert!(ws.join("ran-always").exists(), "{}", r.all());
        assert!(!ws.join("ran-notify").exists(), "{}", r.all());

        // With the condition true the notify stage runs; the pipeline still failed.
        let r = sb.run(["run", "ci.yaml", "--set", "notify=yes"]);
        r.assert_code(1).assert_stdout("Stage `notify` succeeded");
        assert!(ws.join("ran-notify").exists(), "{}", r.all());
    }
}

#[test]
fn stages_skipped_by_their_when_do_not_fail_the_pipeline() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let text = testdata("stage-flow.yaml").replace("exit 3", "exit 0");
        sb.write("ci.yaml", &text);
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("Stage `on_failure` skipped: runs only after a stage has failed")
            .assert_stdout("Stage `deploy` succeeded");
    }
}

#[test]
fn parallel_stages_run_at_the_same_time() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("ci.yaml", &testdata("parallel-stages.yaml"));
        let r = sb.run(["run", "ci.yaml"]);
        // `broken` failed; its siblings ran to the end; `after` did not run.
        r.assert_code(1)
            .assert_stdout("Stage `left` succeeded")
            .assert_stdout("Stage `right` succeeded")
            .assert_stdout("Stage `broken` FAILED")
            .assert_stdout("Stage `after` skipped: an earlier stage failed");
        // Each stage's summary shows its own step, named apart from its siblings'.
        assert!(r.summary_row("left/work").contains("passed"), "{}", r.all());
        assert!(
            r.summary_row("broken/work").contains("FAILED"),
            "{}",
            r.all()
        );
        // The two stages overlapped: each started before the other ended.
        let (ls, le) = (timestamp(&sb, "left.start"), timestamp(&sb, "left.end"));
        let (rs, re) = (timestamp(&sb, "right.start"), timestamp(&sb, "right.end"));
        assert!(
            ls < re && rs < le,
            "no overlap: left {ls}..{le}, right {rs}..{re}"
        );
        assert!(!sb.workspace().join("ran-after").exists(), "{}", r.all());
    }
}

#[test]
fn plan_shows_stage_conditions_and_parallel_blocks() {
    let sb = Sandbox::new(modes()[0]);
    sb.write("flow.yaml", &testdata("stage-flow.yaml"));
    sb.write("par.yaml", &testdata("parallel-stages.yaml"));
    sb.run(["plan", "flow.yaml"])
        .assert_code(0)
        .assert_stdout("runs only after a stage has failed (pipelineStatus: Failure)")
        .assert_stdout("runs if \"no\" == \"yes\"");
    sb.run(["plan", "par.yaml"])
        .assert_code(0)
        .assert_stdout("in parallel with: `right`, `broken`");
}
