//! Rootless namespace entry (`sandbox::userns`), exercised for real: the suite runs as
//! root and spawns `sandrun __unshare` as the unprivileged user `sandrun-test`.

mod prereq;
mod rootless;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Output;

const SANDRUN: &str = env!("CARGO_BIN_EXE_sandrun");

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rootless_maps_subordinate_ranges_and_is_root_inside() {
    let Some(user) = rootless::test_user() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap();
    let file = dir.path().join("owned-by-999");
    let out = user
        .command(SANDRUN)
        .args(["__unshare", "sh", "-c"])
        .arg(format!(
            "cat /proc/self/uid_map; echo id=$(id -u):$(id -g); touch {f} && chown 999:999 {f} && stat -c owner=%u:%g {f}",
            f = file.display()
        ))
        .output()
        .unwrap();
    let text = stdout(&out);
    let map: Vec<Vec<u64>> = text
        .lines()
        .take_while(|l| !l.starts_with("id="))
        .map(|l| l.split_whitespace().map(|n| n.parse().unwrap()).collect())
        .collect();
    assert_eq!(map[0], vec![0, u64::from(user.uid), 1], "{text}");
    assert_eq!(map[1][0], 1, "{text}");
    assert!(map.iter().map(|m| m[2]).sum::<u64>() > 65535, "{text}");
    assert!(text.contains("id=0:0"), "{text}");
    assert!(text.contains("owner=999:999"), "{text}");
    // Outside, the file belongs to the matching subordinate id.
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.uid(), user.first_subuid() + 998);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "no limitation expected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rootless_without_uidmap_maps_one_id_and_says_what_breaks() {
    let Some(user) = rootless::test_user() else {
        return;
    };
    let out = user
        .command(SANDRUN)
        .env("PATH", "/nonexistent")
        .args([
            "__unshare",
            "/bin/sh",
            "-c",
            "read m < /proc/self/uid_map; echo map=$m; read s < /proc/self/setgroups; echo setgroups=$s; /usr/bin/touch /tmp/.sandrun-userns-$$ && /bin/chown 999 /tmp/.sandrun-userns-$$; echo chown=$?; /bin/rm -f /tmp/.sandrun-userns-$$",
        ])
        .output()
        .unwrap();
    let text = stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("map=0 {} 1", user.uid)), "{text}");
    assert!(text.contains("setgroups=deny"), "{text}");
    assert!(
        !text.contains("chown=0"),
        "chown to an unmapped id must fail: {text}"
    );
    assert!(stderr.contains("only one id is mapped"), "{stderr}");
    assert!(stderr.contains("uidmap"), "{stderr}");
}

#[test]
fn a_failing_newuidmap_is_quoted_and_one_id_is_mapped() {
    let Some(user) = rootless::test_user() else {
        return;
    };
    // A newuidmap that refuses, next to the real newgidmap.
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin.path().join("newuidmap");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'newuidmap: range not allowed' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("/usr/bin/newgidmap", bin.path().join("newgidmap")).unwrap();
    let out = user
        .command(SANDRUN)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.path().display()))
        .args([
            "__unshare",
            "/bin/sh",
            "-c",
            "read m < /proc/self/uid_map; echo map=$m",
        ])
        .output()
        .unwrap();
    let text = stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("map=0 {} 1", user.uid)), "{text}");
    assert!(
        stderr.contains(&format!(
            "{} failed (exit status: 1): newuidmap: range not allowed",
            fake.display()
        )),
        "{stderr}"
    );
}

#[test]
fn rootless_sees_cgroup2_only_on_hybrid_hosts() {
    let Some(user) = rootless::test_user() else {
        return;
    };
    let hybrid = nix::sys::statfs::statfs("/sys/fs/cgroup/unified")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        && nix::sys::statfs::statfs("/sys/fs/cgroup")
            .is_ok_and(|s| s.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    let out = user
        .command(SANDRUN)
        .args(["__unshare", "stat", "-f", "-c", "%T", "/sys/fs/cgroup"])
        .output()
        .unwrap();
    let text = stdout(&out);
    if hybrid {
        assert_eq!(text.trim(), "cgroup2fs");
    }
    // The host's own view is untouched.
    let host = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", "/sys/fs/cgroup"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&host.stdout).trim() == "cgroup2fs",
        !hybrid
    );
}

#[test]
fn invoking_user_is_mapped_back_for_host_processes() {
    let Some(user) = rootless::test_user() else {
        return;
    };
    let out = user
        .command(SANDRUN)
        .args([
            "__unshare",
            "--as-invoking-user",
            "sh",
            "-c",
            "echo $(id -u):$(id -g)",
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), format!("{}:{}", user.uid, user.gid));
}

#[test]
fn unshare_as_root_runs_the_command_without_a_user_namespace() {
    if !nix::unistd::geteuid().is_root() {
        prereq::missing("checks the root path");
        return;
    }
    let out = std::process::Command::new(SANDRUN)
        .args(["__unshare", "sh", "-c", "id -u"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "0");
}
