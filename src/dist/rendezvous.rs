//! The start of a run of several ranks: rank 0 listens on MASTER_PORT, every other rank connects
//! twice (a control link, which carries failures and the end of the run, and a data link, which
//! the TCP communicator uses), says who it is and what it was started with, and once all have
//! arrived rank 0 hands each the same payload (NCCL's unique id on GPUs). A rank that does not
//! arrive in time is named; a rank started with other training settings is refused.

use crate::dist::env::WorkerEnv;
use crate::dist::wire::{read_frame, write_frame, FAIL, HELLO, WELCOME};
use anyhow::{bail, Context, Result};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"gmclip01";
const CONTROL: u8 = 0;
const DATA: u8 = 1;

/// A rank's links after the rendezvous. Rank 0 holds one control and one data link per other
/// rank (index r - 1 for rank r); every other rank holds one of each, to rank 0.
pub struct Links {
    pub rank: usize,
    pub world: usize,
    pub control: Vec<TcpStream>,
    pub data: Vec<TcpStream>,
    /// What rank 0 handed out.
    pub payload: Vec<u8>,
}

struct Hello {
    rank: usize,
    world: usize,
    channel: u8,
    fingerprint: [u8; 32],
}

fn hello_bytes(env: &WorkerEnv, channel: u8, fingerprint: &[u8; 32]) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend((env.rank as u32).to_le_bytes());
    b.extend((env.world as u32).to_le_bytes());
    b.push(channel);
    b.extend(fingerprint);
    b
}

fn parse_hello(b: &[u8]) -> Option<Hello> {
    if b.len() != 8 + 4 + 4 + 1 + 32 || &b[..8] != MAGIC {
        return None;
    }
    let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes")) as usize;
    Some(Hello { rank: u(8), world: u(12), channel: b[16], fingerprint: b[17..49].try_into().expect("32 bytes") })
}

/// Meets the other ranks. `fingerprint` identifies the training settings (every rank must bring
/// the same); `payload` is made by rank 0 only, once everyone is there.
pub fn rendezvous(
    env: &WorkerEnv,
    fingerprint: [u8; 32],
    payload: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Links> {
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        serve(env, fingerprint, payload, deadline, timeout)
    } else {
        join(env, fingerprint, deadline, timeout)
    }
}

fn serve(
    env: &WorkerEnv,
    fingerprint: [u8; 32],
    payload: impl FnOnce() -> Result<Vec<u8>>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Links> {
    let port = env.master_port;
    let listener = TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("rank 0 cannot listen on port {port} (MASTER_PORT / --master-port; is it in use?)"))?;
    listener.set_nonblocking(true)?;
    let n = env.world - 1;
    let mut control: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut data: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let refuse = |links: &[Option<TcpStream>], why: &str| {
        for s in links.iter().flatten() {
            let _ = write_frame(s, FAIL, why.as_bytes());
        }
    };
    while control.iter().chain(&data).any(Option::is_none) {
        let (s, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..env.world)
                        .filter(|r| control[r - 1].is_none() || data[r - 1].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    let why = format!(
                        "rank 0 waited {} s on port {port} and rank(s) {} did not arrive (started? MASTER_ADDR and MASTER_PORT right? --rendezvous-timeout)",
                        timeout.as_secs(),
                        missing.join(", ")
                    );
                    refuse(&control, &why);
                    bail!(why);
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rank 0: accepting a rank"),
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // Something that is not a rank of this run (a port scan, a stale worker) is dropped.
        let Ok(Some((HELLO, bytes))) = read_frame(&s) else { continue };
        let Some(h) = parse_hello(&bytes) else { continue };
        if h.world != env.world || h.rank == 0 || h.rank >= env.world {
            let why = format!(
                "a worker from {from} says it is rank {} of {}; this run has {} ranks",
                h.rank, h.world, env.world
            );
            let _ = write_frame(&s, FAIL, why.as_bytes());
            refuse(&control, &why);
            bail!(why);
        }
        if h.fingerprint != fingerprint {
            let why = format!("rank {} was started with other training settings than rank 0 (every rank must be given the same flags)", h.rank);
            let _ = write_frame(&s, FAIL, why.as_bytes());
            refuse(&control, &why);
            bail!(why);
        }
        let slot = if h.channel == CONTROL { &mut control[h.rank - 1] } else { &mut data[h.rank - 1] };
        if slot.is_some() {
            let why = format!("two workers say they are rank {}", h.rank);
            let _ = write_frame(&s, FAIL, why.as_bytes());
            refuse(&control, &why);
            bail!(why);
        }
        s.set_read_timeout(None)?;
        s.set_nodelay(true)?;
        *slot = Some(s);
    }
    let control: Vec<TcpStream> = control.into_iter().map(|s| s.expect("all arrived")).collect();
    let data: Vec<TcpStream> = data.into_iter().map(|s| s.expect("all arrived")).collect();
    let payload = match payload() {
        Ok(p) => p,
        Err(e) => {
            let why = format!("rank 0 could not start the run: {e:#}");
            for s in &control {
                let _ = write_frame(s, FAIL, why.as_bytes());
            }
            return Err(e);
        }
    };
    for (r, s) in control.iter().enumerate() {
        write_frame(s, WELCOME, &payload)
            .with_context(|| format!("rank 0: rank {} left during the rendezvous", r + 1))?;
    }
    Ok(Links { rank: 0, world: env.world, control, data, payload })
}

fn connect(env: &WorkerEnv, deadline: Instant, timeout: Duration) -> Result<TcpStream> {
    let at = format!("{}:{}", env.master_addr, env.master_port);
    loop {
        let addrs: Vec<_> =
            at.to_socket_addrs().with_context(|| format!("MASTER_ADDR {at}: cannot resolve"))?.collect();
        for a in &addrs {
            if let Ok(s) = TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                return Ok(s);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {} could not reach rank 0 at {at} within {} s (is rank 0 running? MASTER_ADDR and MASTER_PORT right? --rendezvous-timeout)",
                env.rank,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn join(env: &WorkerEnv, fingerprint: [u8; 32], deadline: Instant, timeout: Duration) -> Result<Links> {
    let control = connect(env, deadline, timeout)?;
    write_frame(&control, HELLO, &hello_bytes(env, CONTROL, &fingerprint))?;
    let data = connect(env, deadline, timeout)?;
    write_frame(&data, HELLO, &hello_bytes(env, DATA, &fingerprint))?;
    data.set_nodelay(true)?;
    // rank 0 gives up at its own deadline and then says why: wait a little past ours for that word
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(10);
    control.set_read_timeout(Some(left))?;
    let reply = read_frame(&control).map_err(|e| {
        anyhow::anyhow!("rank {}: no word from rank 0 within {} s of the rendezvous ({e})", env.rank, timeout.as_secs())
    })?;
    control.set_read_timeout(None)?;
    match reply {
        Some((WELCOME, payload)) => {
            Ok(Links { rank: env.rank, world: env.world, control: vec![control], data: vec![data], payload })
        }
        Some((FAIL, why)) => bail!("{}", String::from_utf8_lossy(&why)),
        _ => bail!("rank {}: rank 0 closed the link during the rendezvous", env.rank),
    }
}

#[cfg(test)]
mod tests {
    use super::rendezvous;
    use crate::dist::env::WorkerEnv;
    use std::time::Duration;

    fn env(rank: usize, world: usize, port: u16) -> WorkerEnv {
        WorkerEnv { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    /// Runs ranks `present` of a world of `world`, rank r bringing fingerprint `fp(r)`; each
    /// rank's payload or error.
    fn meet(
        world: usize,
        present: &[usize],
        fp: impl Fn(usize) -> u8 + Sync,
        timeout: u64,
    ) -> Vec<Result<Vec<u8>, String>> {
        let port = free_port();
        std::thread::scope(|s| {
            let hs: Vec<_> = present
                .iter()
                .map(|&r| {
                    let fp = &fp;
                    s.spawn(move || {
                        rendezvous(
                            &env(r, world, port),
                            [fp(r); 32],
                            || Ok(vec![7, 8, 9]),
                            Duration::from_secs(timeout),
                        )
                        .map(|l| l.payload)
                        .map_err(|e| format!("{e:#}"))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_rank_zeros_payload() {
        for got in meet(3, &[0, 1, 2], |_| 1, 20) {
            assert_eq!(got.unwrap(), vec![7, 8, 9]);
        }
    }

    #[test]
    fn a_rank_that_never_comes_is_named_on_every_rank() {
        let got = meet(3, &[0, 1], |_| 1, 1);
        for g in got {
            let e = g.unwrap_err();
            assert!(e.contains("rank(s) 2 did not arrive"), "{e}");
        }
    }

    #[test]
    fn a_rank_with_other_settings_is_refused() {
        let got = meet(2, &[0, 1], |r| r as u8, 20);
        for g in got {
            let e = g.unwrap_err();
            assert!(e.contains("rank 1 was started with other training settings"), "{e}");
        }
    }
}
