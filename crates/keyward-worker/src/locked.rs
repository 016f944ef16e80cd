//! Memory for plaintext keys: whole pages mapped for the purpose, locked into RAM
//! (`mlock`: never swapped out), excluded from core dumps (`MADV_DONTDUMP`), and zeroed
//! when a key is done with and again before they are unmapped.
//!
//! A small pool recycles pages so the hot path does not pay for `mmap` + `mlock` per call.
#![allow(unsafe_code)] // mmap/mlock/madvise/munmap are syscalls on raw memory.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Mutex;

use rustix::mm::{Advice, MapFlags, ProtFlags};
use zeroize::Zeroize;

/// One page: enough for an API key plus the HTTP request head that carries it.
pub const PAGE: usize = 8192;

/// A locked, non-dumpable, zero-on-release buffer of [`PAGE`] bytes.
pub struct LockedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: LockedBuf owns its mapping exclusively; nothing else aliases the pointer.
unsafe impl Send for LockedBuf {}

impl LockedBuf {
    pub fn new() -> std::io::Result<LockedBuf> {
        // SAFETY: a fresh anonymous private mapping; we pass a null hint and own the result.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                PAGE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        let buf = LockedBuf { ptr, len: 0 };
        // SAFETY: [raw, raw + PAGE) is the mapping we just made.
        unsafe {
            rustix::mm::mlock(raw, PAGE)?;
            rustix::mm::madvise(raw, PAGE, Advice::LinuxDontDump)?;
        }
        Ok(buf)
    }

    /// The whole page, for writing into.
    pub fn page_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is PAGE bytes, readable and writable, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), PAGE) }
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: len <= PAGE (set_len enforces it), mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(PAGE);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Zeroes the whole page.
    pub fn wipe(&mut self) {
        self.page_mut().zeroize();
        self.len = 0;
    }
}

impl Drop for LockedBuf {
    fn drop(&mut self) {
        self.wipe();
        let raw = self.ptr.as_ptr().cast::<c_void>();
        // SAFETY: unlocking and unmapping exactly the mapping made in new(); not used after.
        unsafe {
            let _ = rustix::mm::munlock(raw, PAGE);
            let _ = rustix::mm::munmap(raw, PAGE);
        }
    }
}

impl std::fmt::Debug for LockedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedBuf([REDACTED], len={})", self.len)
    }
}

/// Recycles wiped pages.
#[derive(Debug, Default)]
pub struct LockedPool {
    free: Mutex<Vec<LockedBuf>>,
}

impl LockedPool {
    pub fn take(&self) -> std::io::Result<PooledBuf<'_>> {
        let buf = match self.free.lock().ok().and_then(|mut f| f.pop()) {
            Some(b) => b,
            None => LockedBuf::new()?,
        };
        Ok(PooledBuf {
            buf: Some(buf),
            pool: self,
        })
    }
}

/// A page on loan from the pool: wiped and returned on drop.
#[derive(Debug)]
pub struct PooledBuf<'a> {
    buf: Option<LockedBuf>,
    pool: &'a LockedPool,
}

impl std::ops::Deref for PooledBuf<'_> {
    type Target = LockedBuf;
    fn deref(&self) -> &LockedBuf {
        // The Option is Some until drop.
        self.buf.as_ref().unwrap_or_else(|| unreachable_buf())
    }
}

impl std::ops::DerefMut for PooledBuf<'_> {
    fn deref_mut(&mut self) -> &mut LockedBuf {
        match self.buf.as_mut() {
            Some(b) => b,
            None => unreachable_buf(),
        }
    }
}

#[allow(clippy::panic)] // impossible: the Option is only taken in drop
fn unreachable_buf() -> ! {
    panic!("locked buffer used after release")
}

impl Drop for PooledBuf<'_> {
    fn drop(&mut self) {
        if let Some(mut b) = self.buf.take() {
            b.wipe();
            if let Ok(mut free) = self.pool.free.lock() {
                if free.len() < 256 {
                    free.push(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_page_is_locked_and_wiped() {
        let pool = LockedPool::default();
        {
            let mut b = pool.take().unwrap();
            b.page_mut()[..4].copy_from_slice(b"sk-x");
            b.set_len(4);
            assert_eq!(b.as_slice(), b"sk-x");
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let locked: u64 = status
                .lines()
                .find(|l| l.starts_with("VmLck:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap();
            assert!(locked >= (PAGE / 1024) as u64, "VmLck {locked} kB");
        }
        let b = pool.take().unwrap();
        assert!(b.is_empty());
        // SAFETY-free check through the public API: the recycled page reads as zeroes.
        let mut b = b;
        assert!(b.page_mut().iter().all(|&x| x == 0));
    }
}
