//! Starting a session's process from a [`ProcessSpec`]: environment, `PATH` lookup, working
//! directory, user, and stdio on pipes or a pseudo-terminal.
//!
//! This is `fork` + `execve` by hand rather than `std::process::Command` because the agent
//! needs things `Command` does not give: the controlling terminal (`setsid` + `TIOCSCTTY`),
//! supplementary groups, and the reason an exec failed, to report Docker's exit codes
//! (127: not found, 126: cannot execute, 125: anything else). The child reports a failure
//! through a close-on-exec pipe: end of file on it means the exec happened.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_agent_protocol::ProcessSpec;

use crate::sys::{self, cvt, errno_text, error_text};
use crate::users;

/// `PATH` when the spec has none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A started process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// Where its stdin goes (a pipe, or the pty master), when the spec asked for stdin.
    pub stdin: Option<OwnedFd>,
    /// Its stdout (the pty master for a tty: stdout and stderr together).
    pub stdout: OwnedFd,
    /// Its stderr; `None` for a tty.
    pub stderr: Option<OwnedFd>,
    /// The pty master, kept for `TIOCSWINSZ`.
    pub pty: Option<OwnedFd>,
}

/// Why a process did not start, as the host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    /// For the user.
    pub message: String,
    /// The shell-style exit code: 127 not found, 126 not executable, 125 otherwise.
    pub code: i32,
}

impl SpawnError {
    fn new(code: i32, message: impl Into<String>) -> Self {
        SpawnError {
            message: message.into(),
            code,
        }
    }

    fn other(message: impl Into<String>) -> Self {
        Self::new(125, message)
    }
}

/// What the child failed at, sent over the error pipe with the errno.
#[repr(i32)]
#[derive(Clone, Copy)]
enum Stage {
    Stdio = 1,
    User = 2,
    Chdir = 3,
    Exec = 4,
}

/// The environment for the process: the spec's, plus `PATH` and `HOME` when it lacks them.
pub fn environment(env: &[String], home: &str) -> Vec<String> {
    let mut out: Vec<String> = env.to_vec();
    let has = |key: &str| {
        env.iter()
            .any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
    };
    if !has("PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has("HOME") {
        out.push(format!("HOME={home}"));
    }
    out
}

/// The value of `key` in a `KEY=VALUE` list (the last one wins, as with `execve`'s callers).
fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find_map(|e| e.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// Finds the program as Go's `exec.LookPath` (and so Docker) does: a name with a `/` is used
/// as is (relative to `cwd`), anything else is searched in `path`, where only regular files
/// with an execute bit count.
pub fn find_program(arg0: &str, path: &str, cwd: &Path) -> Result<PathBuf, SpawnError> {
    if arg0.contains('/') {
        let p = cwd.join(arg0);
        return match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => Err(SpawnError::new(
                126,
                format!("exec: \"{arg0}\": is a directory"),
            )),
            Ok(_) => Ok(p),
            Err(e) => Err(SpawnError::new(
                if e.kind() == io::ErrorKind::NotFound {
                    127
                } else {
                    126
                },
                format!("exec: \"{arg0}\": stat {arg0}: {}", error_text(&e)),
            )),
        };
    }
    if !arg0.is_empty() {
        for dir in path.split(':') {
            let dir = if dir.is_empty() { "." } else { dir };
            let candidate = cwd.join(dir).join(arg0);
            if let Ok(m) = std::fs::metadata(&candidate) {
                if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                    return Ok(candidate);
                }
            }
        }
    }
    Err(SpawnError::new(
        127,
        format!("exec: \"{arg0}\": executable file not found in $PATH"),
    ))
}

fn cstring(s: &str, what: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::other(format!("{what} contains a NUL byte: {s:?}")))
}

/// The child's side of stdio before the fork.
struct ChildStdio {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    tty: bool,
}

/// Opens a pseudo-terminal of `window` (rows, columns): (master, slave).
fn open_pty(window: Option<(u16, u16)>) -> io::Result<(OwnedFd, OwnedFd)> {
    let (rows, cols) = window.unwrap_or((24, 80));
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: master and slave are valid ints to fill; no name buffer or termios is passed;
    // ws is a valid winsize.
    cvt(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    })?;
    // SAFETY: openpty succeeded: both fds are open and ours.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    sys::set_cloexec(master.as_raw_fd())?;
    sys::set_cloexec(slave.as_raw_fd())?;
    Ok((master, slave))
}

/// Sets the terminal size of a pty (`Resize`).
pub fn set_window(pty: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer.
    cvt(unsafe { libc::ioctl(pty, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Starts the process described by `spec`, with users and groups from `/etc`.
pub fn spawn(spec: &ProcessSpec) -> Result<Spawned, SpawnError> {
    let arg0 = spec
        .args
        .first()
        .ok_or_else(|| SpawnError::other("no command given"))?;

    // Who it runs as. Without a user, it runs as the agent does (root as PID 1), so that the
    // host-side tests can run the agent as any user.
    let user = match spec.user.as_deref() {
        Some(u) if !u.is_empty() => Some(
            users::resolve(Some(u), Path::new("/"))
                .map_err(|e| SpawnError::other(e.to_string()))?,
        ),
        _ => None,
    };
    let home = match &user {
        Some(u) => u.home.clone(),
        None => {
            // SAFETY: getuid cannot fail.
            let uid = unsafe { libc::getuid() };
            users::resolve(Some(&uid.to_string()), Path::new("/"))
                .map(|u| u.home)
                .unwrap_or_else(|_| "/".into())
        }
    };
    let env = environment(&spec.env, &home);

    let cwd = PathBuf::from("/").join(spec.cwd.as_deref().unwrap_or("/"));
    if !cwd.exists() {
        std::fs::create_dir_all(&cwd).map_err(|e| {
            SpawnError::other(format!(
                "cannot create the working directory {}: {}",
                cwd.display(),
                error_text(&e)
            ))
        })?;
    }
    let program = find_program(arg0, env_value(&env, "PATH").unwrap_or(""), &cwd)?;

    let c_program = sys::cstr(&program).map_err(|e| SpawnError::other(e.to_string()))?;
    let c_cwd = sys::cstr(&cwd).map_err(|e| SpawnError::other(e.to_string()))?;
    let c_args = spec
        .args
        .iter()
        .map(|a| cstring(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env
        .iter()
        .map(|e| cstring(e, "an environment variable"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = c_env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let groups: Vec<libc::gid_t> = user.as_ref().map(|u| u.groups.clone()).unwrap_or_default();

    let stdio_err = |e: io::Error| SpawnError::other(format!("cannot set up stdio: {e}"));
    let (child, parent_stdin, parent_stdout, parent_stderr, pty) = if spec.tty {
        let (master, slave) = open_pty(spec.window).map_err(stdio_err)?;
        let child = ChildStdio {
            stdin: slave.try_clone().map_err(stdio_err)?,
            stdout: slave.try_clone().map_err(stdio_err)?,
            stderr: slave,
            tty: true,
        };
        let stdin = if spec.stdin {
            Some(master.try_clone().map_err(stdio_err)?)
        } else {
            None
        };
        let pty = master.try_clone().map_err(stdio_err)?;
        (child, stdin, master, None, Some(pty))
    } else {
        let (out_r, out_w) = sys::pipe().map_err(stdio_err)?;
        let (err_r, err_w) = sys::pipe().map_err(stdio_err)?;
        let (child_in, parent_in) = if spec.stdin {
            let (r, w) = sys::pipe().map_err(stdio_err)?;
            (r, Some(w))
        } else {
            let null = std::fs::File::open("/dev/null").map_err(stdio_err)?;
            (OwnedFd::from(null), None)
        };
        let child = ChildStdio {
            stdin: child_in,
            stdout: out_w,
            stderr: err_w,
            tty: false,
        };
        (child, parent_in, out_r, Some(err_r), None)
    };
    let (err_r, err_w) = sys::pipe().map_err(stdio_err)?;

    // SAFETY: fork has no memory-safety preconditions; what the child may do afterwards is
    // constrained in child_after_fork (async-signal-safe calls only).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::other(format!(
            "fork: {}",
            io::Error::last_os_error()
        )));
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork; every pointer was prepared before the fork and
        // stays valid (the child has a copy of the parent's memory).
        unsafe {
            child_after_fork(
                &child,
                user.as_ref().map(|u| (u.uid, u.gid)),
                &groups,
                c_cwd.as_ptr(),
                c_program.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                err_w.as_raw_fd(),
            )
        }
    }
    drop(child);
    drop(err_w);

    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        match sys::read(err_r.as_raw_fd(), &mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(Spawned {
            pid,
            stdin: parent_stdin,
            stdout: parent_stdout,
            stderr: parent_stderr,
            pty,
        });
    }
    // The child failed before (or at) exec and exits: reap it here, it is not a session.
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a valid int.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let stage = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    Err(explain(stage, errno, arg0, &cwd, spec.user.as_deref()))
}

/// Turns the child's (stage, errno) report into Docker's message and code.
fn explain(stage: i32, errno: i32, arg0: &str, cwd: &Path, user: Option<&str>) -> SpawnError {
    let text = errno_text(errno);
    match stage {
        s if s == Stage::Exec as i32 => match errno {
            libc::EACCES | libc::EPERM | libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY => {
                SpawnError::new(126, format!("exec: \"{arg0}\": {text}"))
            }
            libc::ENOENT | libc::ENOTDIR => {
                SpawnError::new(127, format!("exec: \"{arg0}\": {text}"))
            }
            _ => SpawnError::other(format!("exec: \"{arg0}\": {text}")),
        },
        s if s == Stage::Chdir as i32 => SpawnError::other(format!(
            "cannot change to the working directory {}: {text}",
            cwd.display()
        )),
        s if s == Stage::User as i32 => SpawnError::other(format!(
            "cannot switch to user {}: {text}",
            user.unwrap_or("")
        )),
        _ => SpawnError::other(format!("cannot set up the process's stdio: {text}")),
    }
}

/// The child between fork and exec. Only async-signal-safe calls: the agent may have other
/// threads (file copies), whose locks a forked child must not touch.
///
/// # Safety
/// Must be called only in the child of a fork, with pointers valid in its memory image.
#[allow(clippy::too_many_arguments)]
unsafe fn child_after_fork(
    stdio: &ChildStdio,
    ids: Option<(u32, u32)>,
    groups: &[libc::gid_t],
    cwd: *const libc::c_char,
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    err_fd: RawFd,
) -> ! {
    let fail = |stage: Stage| -> ! {
        // SAFETY: reading errno, writing to a pipe and _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&(stage as i32).to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err_fd, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    };
    // SAFETY: each call below is async-signal-safe and gets valid arguments; the fds belong
    // to this process.
    unsafe {
        // Undo what the agent set for itself: Rust ignores SIGPIPE, and ignored signals stay
        // ignored across exec; a blocked mask would be inherited as well.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        // Its own session: signals for its group never reach the agent, and a tty gets a
        // session to be the controlling terminal of.
        if libc::setsid() < 0 {
            fail(Stage::Stdio);
        }
        if stdio.tty && libc::ioctl(stdio.stdout.as_raw_fd(), libc::TIOCSCTTY, 0) < 0 {
            fail(Stage::Stdio);
        }
        if libc::dup2(stdio.stdin.as_raw_fd(), 0) < 0
            || libc::dup2(stdio.stdout.as_raw_fd(), 1) < 0
            || libc::dup2(stdio.stderr.as_raw_fd(), 2) < 0
        {
            fail(Stage::Stdio);
        }
        if let Some((uid, gid)) = ids {
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                fail(Stage::User);
            }
        }
        if libc::chdir(cwd) < 0 {
            fail(Stage::Chdir);
        }
        libc::execve(program, argv, envp);
        fail(Stage::Exec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_home_are_filled_in_only_when_missing() {
        let env = environment(&["A=1".into()], "/root");
        assert_eq!(
            env,
            vec![
                "A=1".to_string(),
                format!("PATH={DEFAULT_PATH}"),
                "HOME=/root".into()
            ]
        );
        let env = environment(&["PATH=/x".into(), "HOME=/h".into()], "/root");
        assert_eq!(env, vec!["PATH=/x".to_string(), "HOME=/h".into()]);
    }

    #[test]
    fn lookup_follows_path_and_skips_non_executables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).expect("a");
        std::fs::create_dir_all(&b).expect("b");
        std::fs::write(a.join("tool"), "").expect("write");
        std::fs::write(b.join("tool"), "").expect("write");
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = format!("{}:{}", a.display(), b.display());
        assert_eq!(
            find_program("tool", &path, Path::new("/")).expect("found"),
            b.join("tool")
        );
        let missing = find_program("nosuch", &path, Path::new("/")).expect_err("missing");
        assert_eq!(missing.code, 127);
        assert_eq!(
            missing.message,
            "exec: \"nosuch\": executable file not found in $PATH"
        );
    }

    #[test]
    fn names_with_a_slash_are_not_searched() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("x"), "").expect("write");
        assert_eq!(
            find_program("./x", "/nowhere", dir.path()).expect("relative"),
            dir.path().join("./x")
        );
        let e = find_program("./nosuch", "", dir.path()).expect_err("missing");
        assert_eq!(e.code, 127);
        assert_eq!(
            e.message,
            "exec: \"./nosuch\": stat ./nosuch: no such file or directory"
        );
        assert_eq!(
            find_program("/", "", dir.path()).expect_err("dir").code,
            126
        );
    }
}
