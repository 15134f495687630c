//! The control links after the rendezvous: how a run of several ranks stops together. A rank whose
//! process dies (killed, crashed) closes its links; a rank that fails with an error says why
//! first. Rank 0 watches every other rank and they watch rank 0; whoever learns of a failure
//! prints one line naming the rank and exits, and rank 0 passes the word on. This matters because
//! a rank waiting inside a NCCL collective for a dead peer would otherwise wait forever. A rank
//! that stops making progress without dying (a hung disk, a stopped process) is caught by a
//! timeout on each rank's progress (`watch_progress`), as torch's NCCL watchdog does.

use crate::dist::wire::{read_frame, write_frame, DONE, FAIL};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Control {
    rank: usize,
    /// Where to send word: rank 0's links to every other rank (with their ranks), or the one link
    /// to rank 0.
    peers: Mutex<Vec<(usize, TcpStream)>>,
    /// This rank finished or already reported its own failure: closed links are expected now.
    quiet: AtomicBool,
    started: Instant,
    /// Milliseconds from `started` to this rank's last `progress`.
    last_progress: AtomicU64,
}

/// The exit status of a rank that stops because another failed (the launcher names the other).
pub const STOPPED_FOR_ANOTHER: i32 = 3;

/// Ends this process at once: exit handlers could wait forever on a NCCL kernel that waits for
/// the dead rank (the driver reclaims the GPU either way).
fn stop(rank: usize, msg: &str) -> ! {
    eprintln!("error: {msg}; stopping rank {rank}");
    // SAFETY: ends the process without running anything more of it
    unsafe { libc::_exit(STOPPED_FOR_ANOTHER) }
}

impl Control {
    /// Starts watching `links` (see `Links::control`) on background threads.
    pub fn start(rank: usize, links: Vec<TcpStream>) -> std::io::Result<Arc<Self>> {
        let peer_ranks: Vec<usize> = if rank == 0 { (1..=links.len()).collect() } else { vec![0] };
        let mut peers = vec![];
        let mut readers = vec![];
        for (r, s) in peer_ranks.into_iter().zip(links) {
            readers.push((r, s.try_clone()?));
            peers.push((r, s));
        }
        let me = Arc::new(Self {
            rank,
            peers: Mutex::new(peers),
            quiet: AtomicBool::new(false),
            started: Instant::now(),
            last_progress: AtomicU64::new(0),
        });
        for (r, s) in readers {
            let me = me.clone();
            std::thread::Builder::new().name(format!("watch-rank-{r}")).spawn(move || me.watch(r, s))?;
        }
        Ok(me)
    }

    fn watch(&self, peer: usize, s: TcpStream) {
        let word = match read_frame(&s) {
            Ok(Some((DONE, _))) => return,
            Ok(Some((FAIL, why))) => Some(String::from_utf8_lossy(&why).to_string()),
            _ => None,
        };
        if self.quiet.load(Ordering::SeqCst) {
            return;
        }
        let msg = match (self.rank, word) {
            // rank 0 already names the failing rank in what it passes on
            (r, Some(why)) if r != 0 => why,
            (_, Some(why)) => format!("rank {peer} failed: {why}"),
            (_, None) => {
                format!(
                    "rank {peer} stopped without finishing (its process ended or its link to rank {} broke)",
                    self.rank
                )
            }
        };
        if self.rank == 0 {
            self.tell_all_but(peer, &msg);
        }
        stop(self.rank, &msg)
    }

    fn tell_all_but(&self, skip: usize, msg: &str) {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for (r, s) in peers.iter() {
            if *r != skip {
                let _ = write_frame(s, FAIL, msg.as_bytes());
            }
        }
    }

    /// This rank failed with `why`: the others stop too, naming it.
    pub fn abort(&self, why: &str) {
        if self.quiet.swap(true, Ordering::SeqCst) {
            return;
        }
        let msg = if self.rank == 0 { format!("rank 0 failed: {why}") } else { why.to_string() };
        self.tell_all_but(usize::MAX, &msg);
    }

    /// This rank finished a unit of work (a training step, an eval batch).
    pub fn progress(&self) {
        self.last_progress.store(self.started.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, `timeout` without `progress` stops the run as hung: the others are told, and
    /// this rank ends. Counted from this call.
    pub fn watch_progress(self: &Arc<Self>, timeout: Duration) -> std::io::Result<()> {
        self.progress();
        let me = self.clone();
        let tick = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
        std::thread::Builder::new().name("watch-progress".into()).spawn(move || loop {
            std::thread::sleep(tick);
            if me.quiet.load(Ordering::SeqCst) {
                return;
            }
            let idle =
                me.started.elapsed().saturating_sub(Duration::from_millis(me.last_progress.load(Ordering::SeqCst)));
            if idle > timeout {
                let why = format!(
                    "no progress on rank {} for {} s: a rank hangs (or --collective-timeout is too short)",
                    me.rank,
                    timeout.as_secs()
                );
                me.abort(&why);
                eprintln!("error: {why}");
                // SAFETY: ends the process without running anything more of it
                unsafe { libc::_exit(1) }
            }
        })?;
        Ok(())
    }

    /// This rank finished its part normally; its links closing is not a failure.
    pub fn finish(&self) {
        if self.quiet.swap(true, Ordering::SeqCst) {
            return;
        }
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for (_, s) in peers.iter() {
            let _ = write_frame(s, DONE, &[]);
        }
    }
}
