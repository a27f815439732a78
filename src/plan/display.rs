//! `sandrun plan`: the plan as a person reads it. Secret values are masked.

use std::fmt::Write as _;

use super::{GroupPlan, LoopPlan, Node, Plan, ProcessTemplate, StepPlan};
use crate::pipeline::StageStatus;

pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    match &plan.pipeline {
        Some(p) => {
            let _ = writeln!(
                out,
                "Pipeline `{}` ({}) from {}",
                p.identifier,
                p.name,
                plan.source.display()
            );
            if let Some(t) = &p.template {
                let _ = writeln!(out, "  from {t}");
            }
        }
        None => {
            let _ = writeln!(out, "Stage file {}", plan.source.display());
        }
    }
    let _ = writeln!(out, "Workspace: {}", plan.workspace.display());
    if !plan.ignored.is_empty() {
        let _ = writeln!(
            out,
            "Ignored (Harness-only fields that mean nothing on one machine):"
        );
        for i in &plan.ignored {
            let _ = writeln!(out, "  {i}");
        }
    }
    for stage in &plan.stages {
        let _ = writeln!(out);
        let _ = writeln!(out, "Stage `{}` ({})", stage.identifier, stage.name);
        if let Some(i) = &stage.instance {
            let _ = write!(
                out,
                "  instance {} of {} of {} `{}`",
                i.index + 1,
                i.count,
                i.kind,
                i.of
            );
            let _ = match i.max_concurrency.filter(|&n| n < i.count) {
                Some(n) => writeln!(out, " (at most {n} at once)"),
                None => writeln!(out),
            };
        }
        if let Some(t) = &stage.template {
            let _ = writeln!(out, "  from {t}");
        }
        if let Some(block) = stage.parallel {
            let siblings: Vec<String> = plan
                .stages
                .iter()
                .filter(|s| s.parallel == Some(block) && s.identifier != stage.identifier)
                .map(|s| format!("`{}`", s.identifier))
                .collect();
            let _ = writeln!(out, "  in parallel with: {}", siblings.join(", "));
        }
        match stage.run_when {
            StageStatus::Success => {}
            StageStatus::Failure => {
                let _ = writeln!(
                    out,
                    "  runs only after a stage has failed (pipelineStatus: Failure)"
                );
            }
            StageStatus::All => {
                let _ = writeln!(
                    out,
                    "  runs whatever the earlier stages did (pipelineStatus: All)"
                );
            }
        }
        if let Some(c) = &stage.condition {
            let _ = writeln!(out, "  runs if {}", c.display());
        }
        if let Some(why) = &stage.skipped {
            let _ = writeln!(out, "  skipped: {why}");
            continue;
        }
        let _ = writeln!(
            out,
            "  network: {} ({})",
            stage.network.mode, stage.network.reason
        );
        if let Some(net) = &stage.net {
            let _ = writeln!(
                out,
                "  subnet: {}/{}{}",
                net.subnet.network,
                net.subnet.prefix_len,
                if net.egress {
                    ", egress allowed"
                } else {
                    ", no egress"
                }
            );
            for s in &net.skipped_names {
                let why = match &s.reason {
                    crate::net::SkipReason::Ambiguous { keys } => {
                        format!("steps {} all claim it", keys.join(", "))
                    }
                    crate::net::SkipReason::Invalid { key } => {
                        format!("it is not a valid hostname (step {key})")
                    }
                };
                let _ = writeln!(out, "  name `{}` resolves to no step: {why}", s.name);
            }
        }
        if let Some(t) = stage.timeout {
            let _ = writeln!(out, "  timeout: {}", crate::ui::format_duration(t));
        }
        if !stage.shared_paths.is_empty() {
            let _ = writeln!(out, "  shared paths: {}", stage.shared_paths.join(", "));
        }
        for w in &stage.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
        for (i, node) in stage.nodes.iter().enumerate() {
            node_lines(&mut out, node, &format!("{}.", i + 1), 2);
        }
    }
    plan.secrets.mask(&out)
}

fn node_lines(out: &mut String, node: &Node, label: &str, indent: usize) {
    let pad = " ".repeat(indent);
    match node {
        Node::Step(s) => step_lines(out, s, label, indent),
        Node::Parallel { nodes } => {
            let _ = writeln!(out, "{pad}{label} parallel:");
            for n in nodes {
                node_lines(out, n, "-", indent + 3);
            }
        }
        Node::Loop(LoopPlan {
            identifier,
            kind,
            max_concurrency,
            nodes,
        }) => {
            let _ = write!(
                out,
                "{pad}{label} {kind} `{identifier}`: {} instances",
                nodes.len()
            );
            let _ = match max_concurrency {
                Some(n) if *n < nodes.len() => writeln!(out, ", at most {n} at once:"),
                _ => writeln!(out, ", all at once:"),
            };
            for n in nodes {
                node_lines(out, n, "-", indent + 3);
            }
        }
        Node::Group(GroupPlan {
            identifier,
            name,
            run_when,
            condition,
            nodes,
            template,
            ..
        }) => {
            let _ = write!(out, "{pad}{label} step group `{identifier}` ({name})");
            if *run_when != StageStatus::Success {
                let _ = write!(out, " when stage status is {run_when:?}");
            }
            if let Some(c) = condition {
                let _ = write!(out, " if {}", c.display());
            }
            let _ = writeln!(out, ":");
            if let Some(t) = template {
                let _ = writeln!(out, "{pad}   from {t}");
            }
            for (i, n) in nodes.iter().enumerate() {
                node_lines(out, n, &format!("{}.", i + 1), indent + 3);
            }
        }
    }
}

fn step_lines(out: &mut String, s: &StepPlan, label: &str, indent: usize) {
    let pad = " ".repeat(indent);
    let more = " ".repeat(indent + label.len() + 1);
    let _ = writeln!(out, "{pad}{label} {} `{}` ({})", s.step_type, s.key, s.name);
    if let Some(t) = &s.template {
        let _ = writeln!(out, "{more}from {t}");
    }
    if let Some(why) = &s.unsupported {
        let _ = writeln!(out, "{more}UNSUPPORTED: {why}");
        return;
    }
    match &s.image {
        Some(img) => {
            let _ = writeln!(
                out,
                "{more}image: {} (pull {:?})",
                img.reference, img.pull_policy
            );
            if crate::recipe::is_recipe_reference(&img.reference) {
                let _ = writeln!(
                    out,
                    "{more}  built from the recipe {} (and its lock), cached by their digest",
                    img.source
                );
            }
            if let Some(note) = &img.connector_note {
                let _ = writeln!(out, "{more}  {note}");
            }
        }
        None => {
            let _ = writeln!(
                out,
                "{more}runs on the host (no image), on the stage's machine network shared by its host steps"
            );
        }
    }
    match &s.process {
        ProcessTemplate::Shell { shell, script } => {
            let text = script.display();
            let mut lines = text.lines();
            let _ = writeln!(out, "{more}{shell:?}: {}", lines.next().unwrap_or(""));
            for l in lines {
                let _ = writeln!(out, "{more}    {l}");
            }
        }
        ProcessTemplate::Exec { argv } => {
            let args: Vec<String> = argv.iter().map(|a| a.display()).collect();
            let _ = writeln!(out, "{more}entrypoint: {args:?}");
        }
        ProcessTemplate::ImageDefault => {
            let _ = writeln!(out, "{more}runs the image's entrypoint");
        }
    }
    if !s.hostnames.is_empty() {
        let _ = write!(out, "{more}hostnames: {}", s.hostnames.join(", "));
        if let Some(a) = s.address {
            let _ = write!(out, "  address: {a}");
        }
        let _ = writeln!(out);
    }
    for (h, c) in &s.port_bindings {
        let _ = writeln!(out, "{more}port: host {h} -> {c}");
    }
    if !s.env.is_empty() {
        let vars: Vec<String> = s
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", v.display()))
            .collect();
        let _ = writeln!(out, "{more}env: {}", vars.join(" "));
    }
    if !s.output_variables.is_empty() {
        let _ = writeln!(out, "{more}outputs: {}", s.output_variables.join(", "));
    }
    if let Some(t) = s.timeout {
        let _ = writeln!(out, "{more}timeout: {}", crate::ui::format_duration(t));
    }
    if s.run_when != StageStatus::Success {
        let _ = writeln!(out, "{more}runs when the stage status is {:?}", s.run_when);
    }
    if let Some(c) = &s.condition {
        let _ = writeln!(out, "{more}runs if {}", c.display());
    }
    for r in &s.on_failure.rules {
        let on = if r.errors.is_empty() {
            "any error".to_string()
        } else {
            format!("{:?}", r.errors)
        };
        let _ = writeln!(out, "{more}on {on}: {:?}", r.action);
    }
    if !s.reports.is_empty() {
        let _ = writeln!(out, "{more}JUnit reports: {}", s.reports.join(", "));
    }
    if s.privileged {
        let _ = writeln!(out, "{more}privileged");
    }
    if let Some(u) = &s.run_as_user {
        let _ = writeln!(out, "{more}runs as user {u}");
    }
    if s.resources.memory.is_some() || s.resources.cpu_millis.is_some() {
        let _ = writeln!(
            out,
            "{more}limits: memory {}, cpu {}",
            s.resources
                .memory
                .map_or("-".into(), |m| format!("{}Mi", m / (1024 * 1024))),
            s.resources
                .cpu_millis
                .map_or("-".into(), |c| format!("{c}m"))
        );
    }
}
