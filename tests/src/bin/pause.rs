//! `ferry-pause`: the program of Ferry's pause image, the first process of every pod sandbox.
//! It holds the pod's namespaces open, reaps the zombies it inherits as PID 1, and exits
//! cleanly on SIGINT or SIGTERM (as PID 1 it has no default handlers, so it installs them).

extern "C" fn quit(_: libc::c_int) {
    unsafe { libc::_exit(0) }
}

extern "C" fn reap(_: libc::c_int) {
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("ferry-pause: warning: not PID 1");
    }
    unsafe {
        libc::signal(libc::SIGINT, quit as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, quit as *const () as libc::sighandler_t);
        libc::signal(libc::SIGCHLD, reap as *const () as libc::sighandler_t);
        loop {
            libc::pause();
        }
    }
}
