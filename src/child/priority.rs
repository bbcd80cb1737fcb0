//! A new generation's CPU priority while it starts next to the serving one.
//!
//! On a reload the new generation's start (HAProxy parsing its config and
//! forking its worker, a Python daemon importing its application) takes
//! CPU time from the generation that serves. With few cores that is
//! latency for the connections served meanwhile (`cargo bench --bench
//! haproxy` measures it). So a reload's generation starts under
//! `SCHED_IDLE` ([`Priority::Idle`], set between fork and exec): it runs
//! on CPU time nothing else wants, and a waking worker of the serving
//! generation preempts it at once. When it says it is ready, or when its
//! time at idle priority is up (`--idle-start`; a busy machine would
//! otherwise delay the reload without bound), the supervisor [`raise`]s
//! every thread of it and of its descendants back to `SCHED_OTHER`.
//!
//! Lowering a priority needs no privilege; raising it back does:
//! `CAP_SYS_NICE` (the shipped units grant it and no other capability), or
//! an `RLIMIT_NICE` that allows nice 0 (`LimitNICE=+0`). [`can_raise`] asks
//! the kernel before the supervisor relies on it; a generation that cannot
//! be raised all the same (a process of it changed its user) fails its
//! reload rather than serve at idle priority.

use std::io;

use nix::libc;
use nix::unistd::Pid;

/// The CPU scheduling policy a child starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// The parent's (what every child gets unless said otherwise).
    #[default]
    Inherit,
    /// `SCHED_IDLE` until [`raise`]d.
    Idle,
}

fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain system call; `param` lives across it.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn policy_of(tid: libc::pid_t) -> io::Result<libc::c_int> {
    // SAFETY: a plain system call with an integer argument.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(policy)
}

/// In the child, between fork and exec: `SCHED_IDLE` for the calling
/// thread, which every thread and process it starts inherits.
/// Async-signal-safe (one system call).
pub(super) fn enter_idle() -> io::Result<()> {
    set_policy(0, libc::SCHED_IDLE)
}

/// Whether this process could raise a child it starts at
/// [`Priority::Idle`] back to `SCHED_OTHER`: tried on a short-lived thread
/// of its own, which the kernel judges as it would the child (same user,
/// same `RLIMIT_NICE`, same capabilities).
pub fn can_raise() -> bool {
    std::thread::spawn(|| set_policy(0, libc::SCHED_IDLE).and_then(|()| set_policy(0, libc::SCHED_OTHER)).is_ok())
        .join()
        .unwrap_or(false)
}

/// Raises every thread of `pid` and of its descendants that is at
/// `SCHED_IDLE` to `SCHED_OTHER`; returns how many it raised. Threads and
/// processes that exit meanwhile are skipped; a thread started from an
/// idle one while this walks is found by the next pass (at most four).
pub fn raise(pid: Pid) -> io::Result<usize> {
    let mut raised = 0;
    for _ in 0..4 {
        let now = raise_once(pid)?;
        raised += now;
        if now == 0 {
            break;
        }
    }
    Ok(raised)
}

fn raise_once(root: Pid) -> io::Result<usize> {
    let mut raised = 0;
    let mut processes = vec![root.as_raw()];
    while let Some(pid) = processes.pop() {
        let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
            Ok(tasks) => tasks,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<libc::pid_t>().ok()) else {
                continue;
            };
            // A thread that exited meanwhile (ESRCH) is skipped.
            if policy_of(tid).is_ok_and(|p| p == libc::SCHED_IDLE) {
                match set_policy(tid, libc::SCHED_OTHER) {
                    Ok(()) => raised += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(e),
                }
            }
            // The processes this thread started (CONFIG_PROC_CHILDREN).
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                processes.extend(children.split_whitespace().filter_map(|c| c.parse::<libc::pid_t>().ok()));
            }
        }
    }
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn is_idle(tid: Pid) -> io::Result<bool> {
        policy_of(tid.as_raw()).map(|p| p == libc::SCHED_IDLE)
    }

    /// A child started idle, with a grandchild that inherits it; raised,
    /// both are back to the normal policy (where raising is allowed: as
    /// root, as the tests run; elsewhere the refusal is the answer).
    #[test]
    fn an_idle_child_and_its_descendants_are_raised() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "sleep 30 & echo $!; wait"]).stdout(std::process::Stdio::piped());
        super::super::prepare_with(&mut cmd, &[], None, Priority::Idle);
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let grandchild = Pid::from_raw(line.trim().parse().unwrap());
        let pid = Pid::from_raw(child.id() as i32);
        assert!(is_idle(pid).unwrap());
        assert!(is_idle(grandchild).unwrap());
        if can_raise() {
            assert_eq!(raise(pid).unwrap(), 2);
            assert!(!is_idle(pid).unwrap());
            assert!(!is_idle(grandchild).unwrap());
        } else {
            // Without CAP_SYS_NICE or RLIMIT_NICE: refused, and said so.
            assert_eq!(raise(pid).unwrap_err().raw_os_error(), Some(libc::EPERM));
        }
        let _ = nix::sys::signal::kill(grandchild, nix::sys::signal::Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
    }
}
