//! The wrapper that makes the containers of one Pod behave like the steps of a stage.
//!
//! Kubernetes starts every container of a Pod at once; a Harness stage runs its steps one
//! after another (a parallel block together), skips the rest after a failure unless a
//! step's `when` says otherwise, retries by its failure strategy, ends it at its timeout
//! and hands its output variables on. Harness's lite-engine does this with an agent
//! binary in every container that a controller talks to; a manifest for a plain
//! `kubectl apply` has no controller, so each step container runs a short script under a
//! static busybox (copied into the Pod's `sandrun` volume by the first init container):
//! it waits for the done markers of the steps before it on that volume, decides from the
//! stage's status files whether to run, runs the step's own command (in the step's image,
//! with its shell), retries or ignores as the failure strategy says, writes its output
//! variables and exit code, and leaves its own done marker.

use std::fmt::Write as _;
use std::time::Duration;

use crate::pipeline::expr::StrMethod;
use crate::pipeline::StageStatus;
use crate::plan::{Action, CondPlan, ErrorKind, FailurePolicy, Template, TemplatePart};
use crate::run::executor::sh_quote;

/// Where the `sandrun` volume is mounted in every container.
pub const STATE_MOUNT: &str = "/sandrun";
/// The static busybox every wrapper runs under.
pub const BUSYBOX: &str = "/sandrun/bin/busybox";
/// Markers, exit codes and output variables.
pub const STATE_DIR: &str = "/sandrun/state";

/// The exit status a step has when busybox's `timeout` ended it (SIGTERM).
const TIMED_OUT: i32 = 143;

/// What one step's wrapper needs to know.
pub struct StepScript<'a> {
    pub key: &'a str,
    /// Keys of the steps that must be done first (the previous block of the stage).
    pub after: &'a [String],
    /// The step's own `when` and those of its enclosing groups: all must hold.
    pub guards: &'a [(StageStatus, Option<&'a CondPlan>)],
    /// Environment variables whose values read other steps' outputs.
    pub dynamic_env: &'a [(String, Template)],
    /// The step's command line (templates: parts may be other steps' outputs).
    pub argv: &'a [Template],
    pub timeout: Option<Duration>,
    pub on_failure: &'a FailurePolicy,
}

/// The directory a step's output variables are written to.
pub fn output_dir(key: &str) -> String {
    format!("{STATE_DIR}/out/{key}")
}

/// The kubelet expands `$(NAME)` in a container's command, args and env values and
/// turns `$$` into `$`; Harness passes them on unchanged. Doubling every `$` of the
/// pipeline's own text makes the kubelet hand the step exactly what the pipeline says
/// (the wrappers' own code has no `$$` and no `$(NAME)` of a variable).
pub fn kubelet_literal(text: &str) -> String {
    text.replace('$', "$$")
}

/// A shell word that expands to the template's value at run time.
fn word(t: &Template) -> String {
    let mut s = String::new();
    let mut text = String::new();
    for p in &t.parts {
        if let TemplatePart::Text(t) = p {
            // Adjacent texts as one quoted word: `'a b'`, not `'a ''b'`.
            text.push_str(t);
            continue;
        }
        if !text.is_empty() {
            s.push_str(&kubelet_literal(&sh_quote(&std::mem::take(&mut text))));
        }
        match p {
            TemplatePart::Text(_) => {}
            // Outputs of other stages are refused before a script is written
            // (kubernetes::cross_stage_reason).
            TemplatePart::StepOutput { step, variable, .. } => {
                let file = format!("{}/{variable}", output_dir(step));
                let _ = write!(s, "\"$({BUSYBOX} cat {} 2>/dev/null)\"", sh_quote(&file));
            }
        }
    }
    if !text.is_empty() || s.is_empty() {
        s.push_str(&kubelet_literal(&sh_quote(&text)));
    }
    s
}

/// A shell test for a `when.condition`.
fn condition(c: &CondPlan) -> String {
    match c {
        CondPlan::Value(t) => format!("[ {} = true ]", word(t)),
        CondPlan::Not(c) => format!("! {{ {}; }}", condition(c)),
        CondPlan::And(a, b) => format!("{{ {}; }} && {{ {}; }}", condition(a), condition(b)),
        CondPlan::Or(a, b) => format!("{{ {}; }} || {{ {}; }}", condition(a), condition(b)),
        CondPlan::Compare { left, equal, right } => format!(
            "[ {} {} {} ]",
            word(left),
            if *equal { "=" } else { "!=" },
            word(right)
        ),
        // JEXL's order and string tests, in busybox awk: the operands come through the
        // environment (awk's -v would interpret backslashes), and compare as numbers
        // when both are numbers, else as strings, as Harness does.
        CondPlan::Order { left, op, right } => awk_test(
            left,
            right,
            &format!(
                "(num(a) && num(b) ? a + 0 {op} b + 0 : a \"\" {op} b \"\")",
                op = op.symbol()
            ),
        ),
        CondPlan::Test {
            target,
            method,
            arg,
        } => awk_test(
            target,
            arg,
            match method {
                StrMethod::Contains => "index(a, b) > 0",
                StrMethod::StartsWith => "substr(a, 1, length(b)) == b",
                StrMethod::EndsWith => {
                    "length(a) >= length(b) && substr(a, length(a) - length(b) + 1) == b"
                }
                StrMethod::Equals => "a \"\" == b \"\"",
                StrMethod::EqualsIgnoreCase => "tolower(a) == tolower(b)",
            },
        ),
    }
}

/// A shell test that is true when the awk expression `test` over `a` and `b` holds.
fn awk_test(a: &Template, b: &Template, test: &str) -> String {
    let program = format!(
        "function num(x) {{ return x ~ /^[-+]?[0-9]+([.][0-9]+)?$/ }} \
         BEGIN {{ a = ENVIRON[\"A\"]; b = ENVIRON[\"B\"]; exit !({test}) }}"
    );
    format!(
        "A={} B={} {BUSYBOX} awk {}",
        word(a),
        word(b),
        kubelet_literal(&sh_quote(&program))
    )
}

fn stage_status(s: StageStatus) -> Option<&'static str> {
    match s {
        StageStatus::Success => Some(r#"[ ! -e "$S/failed" ]"#),
        StageStatus::Failure => Some(r#"[ -e "$S/failed" ]"#),
        StageStatus::All => None,
    }
}

/// Shell lines that act on a failure of the kind in `$kind`, inside the retry loop.
fn action(a: &Action, out: &mut String, depth: usize) {
    let pad = "    ".repeat(depth);
    match a {
        Action::Ignore | Action::MarkAsSuccess => {
            let _ = writeln!(out, "{pad}counted=0; break");
        }
        Action::MarkAsFailure => {
            let _ = writeln!(out, "{pad}counted=$code; break");
        }
        Action::Abort => {
            let _ = writeln!(out, "{pad}: > \"$S/aborted\"; counted=$code; break");
        }
        Action::Retry {
            count,
            intervals,
            then,
        } => {
            let _ = writeln!(out, "{pad}if [ \"$attempt\" -lt {count} ]; then");
            if !intervals.is_empty() {
                let _ = writeln!(out, "{pad}    case $attempt in");
                for (i, d) in intervals.iter().enumerate() {
                    let pattern = if i + 1 == intervals.len() {
                        "*".to_string()
                    } else {
                        i.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "{pad}        {pattern}) {BUSYBOX} sleep {} ;;",
                        d.as_secs().max(1)
                    );
                }
                let _ = writeln!(out, "{pad}    esac");
            }
            let _ = writeln!(
                out,
                "{pad}    attempt=$((attempt + 1)); echo \"sandrun: retry $attempt of {count}\" >&2; continue"
            );
            let _ = writeln!(out, "{pad}fi");
            action(then, out, depth);
        }
    }
}

/// The whole wrapper script for one step.
pub fn script(s: &StepScript<'_>) -> String {
    let mut out = String::new();
    let key = sh_quote(s.key);
    let _ = writeln!(out, "S={STATE_DIR}");
    if !s.after.is_empty() {
        let markers: Vec<String> = s
            .after
            .iter()
            .map(|k| sh_quote(&format!("{k}.done")))
            .collect();
        let _ = writeln!(
            out,
            "for m in {}; do until [ -e \"$S/$m\" ]; do {BUSYBOX} sleep 1; done; done",
            markers.join(" ")
        );
    }
    let _ = writeln!(
        out,
        "finish() {{ echo \"$1\" > \"$S/\"{key}.exit; : > \"$S/\"{key}.done; exit \"$2\"; }}"
    );
    let mut tests = vec![r#"[ ! -e "$S/aborted" ]"#.to_string()];
    for (status, cond) in s.guards {
        if let Some(t) = stage_status(*status) {
            if !tests.iter().any(|x| x == t) {
                tests.push(t.to_string());
            }
        }
        if let Some(c) = cond {
            tests.push(format!("{{ {}; }}", condition(c)));
        }
    }
    let _ = writeln!(
        out,
        "if ! {{ {}; }}; then echo \"sandrun: step {} skipped (when)\" >&2; finish skipped 0; fi",
        tests.join(" && "),
        s.key.replace(['"', '$', '`', '\\'], "_")
    );
    for (name, value) in s.dynamic_env {
        let _ = writeln!(out, "export {name}={}", word(value));
    }
    let _ = writeln!(out, "{BUSYBOX} mkdir -p {}", sh_quote(&output_dir(s.key)));
    let argv: Vec<String> = s.argv.iter().map(word).collect();
    let _ = writeln!(out, "set -- {}", argv.join(" "));
    let run = match s.timeout {
        Some(t) => format!("{BUSYBOX} timeout {} \"$@\"", t.as_secs().max(1)),
        None => "\"$@\"".into(),
    };
    let _ = writeln!(out, "attempt=0");
    let _ = writeln!(out, "while :; do");
    let _ = writeln!(out, "    {run}; code=$?");
    let _ = writeln!(out, "    [ \"$code\" -eq 0 ] && {{ counted=0; break; }}");
    let timeout_rule = s.on_failure.action_for(ErrorKind::Timeout);
    let failure_rule = s.on_failure.action_for(ErrorKind::Failure);
    let default = Action::MarkAsFailure;
    if s.timeout.is_some() && timeout_rule != failure_rule {
        let _ = writeln!(out, "    if [ \"$code\" -eq {TIMED_OUT} ]; then");
        action(timeout_rule.unwrap_or(&default), &mut out, 2);
        let _ = writeln!(out, "    fi");
    }
    action(failure_rule.unwrap_or(&default), &mut out, 1);
    let _ = writeln!(out, "done");
    let _ = writeln!(out, "[ \"$counted\" -ne 0 ] && : > \"$S/failed\"");
    let _ = write!(out, "finish \"$code\" \"$counted\"");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::FailureRule;

    fn lit(s: &str) -> Template {
        Template::literal(s)
    }

    fn run(script: &str, state: &std::path::Path) -> (i32, String) {
        // The wrapper names busybox by its path in the Pod; run it with the host's
        // static busybox (Debian's busybox-static, which the test setup installs),
        // against a temporary state directory.
        assert!(
            std::path::Path::new("/bin/busybox").exists(),
            "/bin/busybox is missing (Debian package: busybox-static)"
        );
        let text = script
            .replace("$$", "$")
            .replace(BUSYBOX, "/bin/busybox")
            .replace(STATE_DIR, &state.to_string_lossy());
        let out = std::process::Command::new("/bin/busybox")
            .arg("sh")
            .arg("-c")
            .arg(&text)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn step<'a>(
        key: &'a str,
        argv: &'a [Template],
        guards: &'a [(StageStatus, Option<&'a CondPlan>)],
        policy: &'a FailurePolicy,
    ) -> StepScript<'a> {
        StepScript {
            key,
            after: &[],
            guards,
            dynamic_env: &[],
            argv,
            timeout: None,
            on_failure: policy,
        }
    }

    #[test]
    fn a_failure_marks_the_stage_and_the_next_success_step_skips() {
        let dir = tempfile::tempdir().unwrap();
        let none = FailurePolicy::default();
        let guards = [(StageStatus::Success, None)];
        let fail = [lit("sh"), lit("-c"), lit("exit 3")];
        let (code, _) = run(&script(&step("a", &fail, &guards, &none)), dir.path());
        assert_eq!(code, 3);
        assert!(dir.path().join("failed").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.exit")).unwrap(),
            "3\n"
        );
        let ok = [lit("true")];
        let (code, err) = run(&script(&step("b", &ok, &guards, &none)), dir.path());
        assert_eq!(code, 0);
        assert!(err.contains("step b skipped"), "{err}");
        let on_failure = [(StageStatus::Failure, None)];
        let (code, err) = run(&script(&step("c", &ok, &on_failure, &none)), dir.path());
        assert_eq!((code, err.as_str()), (0, ""));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("c.exit")).unwrap(),
            "0\n"
        );
    }

    #[test]
    fn ignore_keeps_the_stage_green_and_retry_reruns() {
        let dir = tempfile::tempdir().unwrap();
        let ignore = FailurePolicy {
            rules: vec![FailureRule {
                errors: vec![],
                action: Action::Ignore,
            }],
        };
        let guards = [(StageStatus::Success, None)];
        let fail = [lit("false")];
        let (code, _) = run(&script(&step("a", &fail, &guards, &ignore)), dir.path());
        assert_eq!(code, 0);
        assert!(!dir.path().join("failed").exists());
        let retry = FailurePolicy {
            rules: vec![FailureRule {
                errors: vec![],
                action: Action::Retry {
                    count: 2,
                    intervals: vec![],
                    then: Box::new(Action::MarkAsFailure),
                },
            }],
        };
        // Fails twice, then succeeds: a counter file in the state directory.
        let counter = dir.path().join("n");
        let body = format!(
            "n=$(cat {0} 2>/dev/null || echo 0); echo $((n+1)) > {0}; [ $n -ge 2 ]",
            counter.display()
        );
        let argv = [lit("sh"), lit("-c"), lit(&body)];
        let (code, err) = run(&script(&step("b", &argv, &guards, &retry)), dir.path());
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("retry 2 of 2"), "{err}");
    }

    #[test]
    fn a_timeout_has_its_own_rule() {
        let dir = tempfile::tempdir().unwrap();
        let policy = FailurePolicy {
            rules: vec![FailureRule {
                errors: vec![ErrorKind::Timeout],
                action: Action::Ignore,
            }],
        };
        let guards = [(StageStatus::Success, None)];
        let slow = [lit("sleep"), lit("5")];
        let s = StepScript {
            timeout: Some(Duration::from_secs(1)),
            ..step("slow", &slow, &guards, &policy)
        };
        let (code, _) = run(&script(&s), dir.path());
        assert_eq!(code, 0);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("slow.exit")).unwrap(),
            "143\n"
        );
        // Any other failure still counts.
        let fail = [lit("false")];
        let s = StepScript {
            timeout: Some(Duration::from_secs(1)),
            ..step("fails", &fail, &guards, &policy)
        };
        assert_eq!(run(&script(&s), dir.path()).0, 1);
        assert!(dir.path().join("failed").exists());
    }

    #[test]
    fn outputs_of_earlier_steps_reach_arguments_and_conditions() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out/build");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("VERSION"), "1.2").unwrap();
        let version = Template {
            parts: vec![TemplatePart::StepOutput {
                stage: None,
                step: "build".into(),
                variable: "VERSION".into(),
            }],
        };
        let cond = CondPlan::Compare {
            left: version.clone(),
            equal: true,
            right: lit("1.2"),
        };
        let guards = [(StageStatus::Success, Some(&cond))];
        let script_arg = lit("[ \"$1\" = v1.2 ] && [ \"$V\" = 1.2 ]");
        let mut arg = lit("v");
        arg.parts.extend(version.parts.clone());
        let argv = [lit("sh"), lit("-c"), script_arg, lit("sh"), arg];
        let env = [("V".to_string(), version)];
        let none = FailurePolicy::default();
        let s = StepScript {
            dynamic_env: &env,
            ..step("t", &argv, &guards, &none)
        };
        let (code, err) = run(&script(&s), dir.path());
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("t.exit")).unwrap(),
            "0\n"
        );
    }

    #[test]
    fn order_and_string_tests_decide_like_jexl() {
        use crate::pipeline::expr::OrderOp;
        let dir = tempfile::tempdir().unwrap();
        let none = FailurePolicy::default();
        let ok = [lit("true")];
        let cases = [
            // numbers compare as numbers, other text as text
            (
                CondPlan::Order {
                    left: lit("9"),
                    op: OrderOp::Lt,
                    right: lit("10"),
                },
                true,
            ),
            (
                CondPlan::Order {
                    left: lit("b9"),
                    op: OrderOp::Lt,
                    right: lit("b10"),
                },
                false,
            ),
            (
                CondPlan::Order {
                    left: lit("2.5"),
                    op: OrderOp::Ge,
                    right: lit("2.5"),
                },
                true,
            ),
            (
                CondPlan::Test {
                    target: lit("release/1.2"),
                    method: StrMethod::StartsWith,
                    arg: lit("release/"),
                },
                true,
            ),
            (
                CondPlan::Test {
                    target: lit("main"),
                    method: StrMethod::StartsWith,
                    arg: lit("release/"),
                },
                false,
            ),
            (
                CondPlan::Test {
                    target: lit("a\\b $x"),
                    method: StrMethod::Contains,
                    arg: lit("\\b $"),
                },
                true,
            ),
            (
                CondPlan::Test {
                    target: lit("x.yaml"),
                    method: StrMethod::EndsWith,
                    arg: lit(".yaml"),
                },
                true,
            ),
            (
                CondPlan::Test {
                    target: lit("1.0"),
                    method: StrMethod::Equals,
                    arg: lit("1"),
                },
                false,
            ),
            (
                CondPlan::Test {
                    target: lit("Main"),
                    method: StrMethod::EqualsIgnoreCase,
                    arg: lit("mAIN"),
                },
                true,
            ),
        ];
        for (i, (cond, runs)) in cases.iter().enumerate() {
            let guards = [(StageStatus::All, Some(cond))];
            let key = format!("c{i}");
            let (code, err) = run(&script(&step(&key, &ok, &guards, &none)), dir.path());
            assert_eq!(code, 0, "{cond:?}: {err}");
            assert_eq!(err.contains("skipped"), !runs, "{cond:?}: {err}");
        }
    }
}
