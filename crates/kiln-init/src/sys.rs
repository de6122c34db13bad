//! Thin wrappers over the system calls the agent makes, so the `unsafe` is in one place and
//! every caller gets an `io::Result`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// Turns a `-1` return into the thread's `errno`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`] for calls returning `ssize_t`.
fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A path as a C string; a path with a NUL byte cannot name a file.
pub fn cstr(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A close-on-exec pipe: (read end, write end). Close-on-exec so that one session's pipes never
/// leak into another session's process.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd the caller owns touch nothing but its flags.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        cvt(libc::fcntl(fd, libc::F_SETFL, flags))?;
    }
    Ok(())
}

/// Sets `FD_CLOEXEC` (for fds from calls that have no flag for it, such as `openpty`).
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an fd the caller owns only changes its close-on-exec flag.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(())
}

/// `read(2)`, retried on `EINTR`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let r = cvt_size(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// `write(2)`, retried on `EINTR`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let r = cvt_size(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Writes all of `buf` to a blocking fd.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// `poll(2)` over `fds`; `None` waits forever. `EINTR` (a SIGCHLD, typically) is a normal
/// return with nothing ready.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        Some(d) => {
            // Round up so a 0.3 ms deadline does not become a busy 0 ms poll.
            let ms = d.as_micros().div_ceil(1000);
            ms.min(i32::MAX as u128) as libc::c_int
        }
    };
    // SAFETY: fds is a valid, exclusively borrowed array of fds.len() pollfd structs.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Polls one fd for `events` without waiting and returns its `revents`.
pub fn poll_now(fd: RawFd, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    poll(&mut p, Some(Duration::ZERO))?;
    Ok(p[0].revents)
}

/// Milliseconds since the kernel started, counting suspend (`CLOCK_BOOTTIME`): the guest's
/// boot time as the host wants to report it.
pub fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// The write end of the self-pipe the SIGCHLD handler writes to (-1 before it is set up).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking, so a full pipe
        // (a wake-up is already pending) just fails with EAGAIN. errno is saved and restored
        // so the interrupted code does not see it change.
        unsafe {
            let saved = *libc::__errno_location();
            libc::write(fd, (&byte as *const u8).cast(), 1);
            *libc::__errno_location() = saved;
        }
    }
}

/// The self-pipe that wakes the event loop: the SIGCHLD handler and the copy threads write a
/// byte to it, the loop polls its read end. A signal handler can do nothing safely but write
/// to a pipe, and a pipe is something `poll` can wait for together with everything else.
#[derive(Debug)]
pub struct Waker {
    read: OwnedFd,
    write: OwnedFd,
}

impl Waker {
    /// Creates the pipe and installs the SIGCHLD handler that writes to it. Only one waker may
    /// exist per process (the handler has one global fd).
    pub fn install() -> io::Result<Waker> {
        let (read, write) = pipe()?;
        set_nonblocking(read.as_raw_fd(), true)?;
        set_nonblocking(write.as_raw_fd(), true)?;
        WAKE_FD.store(write.as_raw_fd(), Ordering::Relaxed);
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only calls
        // async-signal-safe functions (see on_sigchld).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigchld as *const () as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
            libc::sigemptyset(&mut sa.sa_mask);
            cvt(libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()))?;
        }
        Ok(Waker { read, write })
    }

    /// The fd to poll for wake-ups.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// A duplicate of the write end for a thread to wake the loop with.
    pub fn handle(&self) -> io::Result<WakeHandle> {
        Ok(WakeHandle(self.write.try_clone()?))
    }

    /// Empties the pipe after a wake-up.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!(read(self.read.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        WAKE_FD.store(-1, Ordering::Relaxed);
    }
}

/// Wakes the event loop from another thread.
#[derive(Debug)]
pub struct WakeHandle(OwnedFd);

impl WakeHandle {
    /// Makes the loop's next (or current) poll return.
    pub fn wake(&self) {
        let _ = write(self.0.as_raw_fd(), &[1]);
    }
}

/// Sleeps; a thin name for the few places that have to wait for the kernel (a device node to
/// appear) with nothing to poll.
pub fn sleep(d: Duration) {
    std::thread::sleep(d);
}

/// `mount(2)`. `data` is the file system's own option string.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = CString::new(source)?;
    let target = cstr(target)?;
    let fstype = CString::new(fstype)?;
    let data = data.map(CString::new).transpose()?;
    // SAFETY: all pointers are valid NUL-terminated strings (or null for no data) that live
    // across the call.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })?;
    Ok(())
}

/// `mount --move FROM TO`.
pub fn mount_move(from: &Path, to: &Path) -> io::Result<()> {
    let from = cstr(from)?;
    let to = cstr(to)?;
    // SAFETY: valid NUL-terminated paths; MS_MOVE ignores the type and data.
    cvt(unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// The kernel's message for `errno` the way Go (and so Docker) prints it: lower case, without
/// Rust's " (os error N)" suffix.
pub fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// [`errno_text`] of an `io::Error`, or its own text if it carries no errno.
pub fn error_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => errno_text(errno),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_text_reads_like_go() {
        assert_eq!(errno_text(libc::ENOENT), "no such file or directory");
        assert_eq!(errno_text(libc::EACCES), "permission denied");
    }
}
