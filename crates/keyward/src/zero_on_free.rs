//! The binary's global allocator: the system allocator, except that every block is zeroed
//! before it is given back.
//!
//! Why: a model key pasted into keyward passes through buffers keyward does not own (hyper's
//! connection read buffer, serde_json's scratch space, a `Vec` that moved when it grew). All
//! of them are freed in the end, but the system allocator leaves a freed block's bytes where
//! they were until that memory is handed out again and overwritten, so a key could be read
//! back out of the gateway's memory long after the save (by a memory-disclosure bug, a core
//! file, or anyone who can read `/proc/<pid>/mem`). With this allocator a freed block holds
//! only zeros. It serves every command of the binary, so the worker gets it too.
//!
//! What it does not cover: memory still in use (keyward wipes the buffers it owns, and a key
//! save closes its connection so hyper frees its read buffer), stacks and registers, memory
//! that C libraries (SQLite, aws-lc) get from `malloc` directly, and the kernel's buffers.
//!
//! What it costs: each free writes zeros over the whole block first (a `memset` of its size),
//! and `realloc` always moves the block (allocate, copy, zero and free the old one), where
//! the system allocator can sometimes grow or shrink in place. A buffer that grows by
//! doubling copies at most as much as it would have in the system allocator's worst case.

#![allow(unsafe_code)] // `GlobalAlloc` is an unsafe trait; the wipe is libc's `explicit_bzero`.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;

/// `A`, with every block zeroed before it is freed (see the module documentation).
#[derive(Debug)]
pub struct ZeroOnFree<A>(A);

impl<A> ZeroOnFree<A> {
    pub const fn new(inner: A) -> ZeroOnFree<A> {
        ZeroOnFree(inner)
    }
}

/// Zeroes `len` bytes at `ptr`. `explicit_bzero` is a `memset` the compiler may not remove:
/// a plain one right before `free` is a dead store that the optimiser is allowed to drop.
///
/// # Safety
/// `ptr..ptr + len` must be memory the caller may write.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    if len > 0 {
        // SAFETY: the caller guarantees the range is writable; explicit_bzero writes only it.
        unsafe { libc::explicit_bzero(ptr.cast(), len) }
    }
}

// SAFETY: every block comes from `A` and goes back to `A` with the layout it was allocated
// with, so `A`'s guarantees carry over; `wipe` only writes inside a block the caller owns
// and is about to give up, and `realloc` hands the old block to `dealloc` only after its
// contents were copied to a new block of the requested size.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ZeroOnFree<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (non-zero-size) layout.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes that the caller gives up.
        unsafe {
            wipe(ptr, layout.size());
            self.0.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Never `A::realloc`: when it moves the block it frees the old one with the data
        // still in it, and when it shrinks in place the cut-off tail keeps its bytes.
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        // SAFETY: `new_layout` has a non-zero size (the caller's contract for `realloc`).
        let new = unsafe { self.0.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this many bytes long;
            // the old block is then ours to free (the caller gave it up to `realloc`).
            unsafe {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        // On failure the old block is untouched and still the caller's, as `realloc` requires.
        new
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::System;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// The system allocator, counting the frees and those whose block still held a non-zero
    /// byte when it was given back (reading it there is fine: it is not freed yet).
    #[derive(Default)]
    struct Spy {
        frees: AtomicUsize,
        dirty: AtomicUsize,
    }

    unsafe impl GlobalAlloc for Spy {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let bytes = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            self.frees.fetch_add(1, Ordering::SeqCst);
            if bytes.iter().any(|b| *b != 0) {
                self.dirty.fetch_add(1, Ordering::SeqCst);
            }
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    impl Spy {
        fn counts(&self) -> (usize, usize) {
            (self.frees.load(Ordering::SeqCst), self.dirty.load(Ordering::SeqCst))
        }
    }

    /// Allocates `len` bytes from `a`, filled with a pattern.
    fn filled(a: &impl GlobalAlloc, len: usize) -> (*mut u8, Layout) {
        let layout = Layout::from_size_align(len, 8).unwrap();
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        for i in 0..len {
            unsafe { p.add(i).write(0xA0 | (i % 16) as u8) };
        }
        (p, layout)
    }

    #[test]
    fn a_freed_block_holds_only_zeros() {
        // Control: without the wrapper, the spy does see the data left in a freed block.
        let plain = Spy::default();
        let (p, layout) = filled(&plain, 100);
        unsafe { plain.dealloc(p, layout) };
        assert_eq!(plain.counts(), (1, 1));

        let a = ZeroOnFree::new(Spy::default());
        for len in [1, 7, 64, 4096, 300_000] {
            let (p, layout) = filled(&a, len);
            unsafe { a.dealloc(p, layout) };
        }
        assert_eq!(a.0.counts(), (5, 0), "(frees, frees of a block still holding data)");
    }

    #[test]
    fn realloc_moves_keeps_the_data_and_wipes_the_old_block() {
        let a = ZeroOnFree::new(Spy::default());
        let (p, layout) = filled(&a, 48);
        let expected: Vec<u8> = unsafe { std::slice::from_raw_parts(p, 48) }.to_vec();
        // Grow: the data moves, the old block is zeroed as it is freed.
        let grown = unsafe { a.realloc(p, layout, 8192) };
        assert!(!grown.is_null());
        assert_eq!(unsafe { std::slice::from_raw_parts(grown, 48) }, expected.as_slice());
        assert_eq!(a.0.counts(), (1, 0));
        // Shrink: what is kept is intact, and the whole old block (the cut-off tail too) is zeroed.
        let big = Layout::from_size_align(8192, 8).unwrap();
        let shrunk = unsafe { a.realloc(grown, big, 16) };
        assert!(!shrunk.is_null());
        assert_eq!(unsafe { std::slice::from_raw_parts(shrunk, 16) }, &expected[..16]);
        assert_eq!(a.0.counts(), (2, 0));
        unsafe { a.dealloc(shrunk, Layout::from_size_align(16, 8).unwrap()) };
        assert_eq!(a.0.counts(), (3, 0));
    }

    #[test]
    fn zeroed_allocations_are_zero() {
        let a = ZeroOnFree::new(System);
        let layout = Layout::from_size_align(1000, 16).unwrap();
        let p = unsafe { a.alloc_zeroed(layout) };
        assert!(!p.is_null());
        assert!(unsafe { std::slice::from_raw_parts(p, 1000) }.iter().all(|b| *b == 0));
        unsafe { a.dealloc(p, layout) };
    }
}
