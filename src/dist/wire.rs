//! Frames on the TCP links between ranks: a tag byte, a little-endian u64 length, the bytes.

use anyhow::{bail, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

pub const HELLO: u8 = 1;
pub const WELCOME: u8 = 2;
pub const FAIL: u8 = 3;
pub const DONE: u8 = 4;
pub const DATA: u8 = 5;

/// Frames larger than this are refused (a stray connection's garbage, not a gradient).
const MAX_FRAME: u64 = 1 << 36;

pub fn write_frame(mut s: &TcpStream, tag: u8, bytes: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(bytes)?;
    s.flush()
}

/// The next frame, or None where the other side closed the link before a new frame began.
pub fn read_frame(mut s: &TcpStream) -> Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 9];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        bail!("a frame of {len} bytes: not a gemmaclip peer");
    }
    let mut bytes = vec![0u8; len as usize];
    s.read_exact(&mut bytes)?;
    Ok(Some((head[0], bytes)))
}

pub fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}
