//! Two simulated hosts: network namespaces joined by a veth pair, each with its own host name,
//! and OpenMPI's remote launcher replaced by a script entering the other namespace. Ranks on
//! different "hosts" talk over TCP, the code path of a real multi-machine job. Needs root
//! (`ip netns`); skipped otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use burn_coop_mpi::testing::{find_mpirun, run_with_deadline};

const M: usize = 4;

/// Deletes the namespaces (and with them the veth pair) when dropped.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[test]
fn four_ranks_on_two_namespace_hosts_match_in_process_workers() {
    let Some(mpirun) = find_mpirun() else {
        eprintln!("skipping: mpirun is not on PATH (install openmpi-bin)");
        return;
    };
    if Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("skipping: unshare is not available");
        return;
    }
    let id = std::process::id() % 100_000;
    let (host_a, host_b) = (format!("bcmpi{id}a"), format!("bcmpi{id}b"));
    let (veth_a, veth_b) = (format!("bcv{id}a"), format!("bcv{id}b"));
    let mut namespaces = Namespaces(Vec::new());
    for host in [&host_a, &host_b] {
        if let Err(error) = ip(&["netns", "add", host]) {
            eprintln!("skipping: cannot create a network namespace ({error})");
            return;
        }
        namespaces.0.push(host.clone());
    }
    let setup = [
        vec!["link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b],
        vec!["link", "set", &veth_a, "netns", &host_a],
        vec!["link", "set", &veth_b, "netns", &host_b],
        vec!["-n", &host_a, "addr", "add", "10.211.0.1/24", "dev", &veth_a],
        vec!["-n", &host_b, "addr", "add", "10.211.0.2/24", "dev", &veth_b],
        vec!["-n", &host_a, "link", "set", &veth_a, "up"],
        vec!["-n", &host_b, "link", "set", &veth_b, "up"],
        vec!["-n", &host_a, "link", "set", "lo", "up"],
        vec!["-n", &host_b, "link", "set", "lo", "up"],
    ];
    for args in &setup {
        if let Err(error) = ip(args) {
            eprintln!("skipping: cannot set up the veth pair ({error})");
            return;
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("netns-rsh");
    std::fs::write(
        &agent,
        "#!/bin/sh\nhost=\"$1\"; shift\nexec ip netns exec \"$host\" unshare --uts /bin/sh -c \"hostname $host; $*\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hostfile = dir.path().join("hostfile");
    std::fs::write(&hostfile, format!("{host_a} slots=2\n{host_b} slots=2\n")).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();

    let launch = format!(
        "hostname {host_a}; exec {mpirun} --oversubscribe --hostfile {hostfile} --mca plm_rsh_agent {agent} \
         --mca oob_tcp_if_include 10.211.0.0/24 --mca btl self,vader,tcp --mca btl_tcp_if_include 10.211.0.0/24 \
         --mca mpi_yield_when_idle 1 -np {M} {bin} {out}",
        mpirun = mpirun.display(),
        hostfile = hostfile.display(),
        agent = agent.display(),
        bin = env!("CARGO_BIN_EXE_mpi-equivalence"),
        out = out.display(),
    );
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &host_a, "unshare", "--uts", "/bin/sh", "-c", &launch])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let run = run_with_deadline(command, Duration::from_secs(240)).unwrap();
    let output = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        run.status.is_some_and(|s| s.success()),
        "mpirun over two namespaces failed or hung ({:?} after {:?})\n{output}",
        run.status,
        run.elapsed
    );
    for host in [&host_a, &host_b] {
        assert!(run.stdout.contains(&format!("on host {host}:")), "no rank ran on {host}\n{output}");
    }
    common::check_against_in_process(&out, M);
    drop(namespaces);
}
