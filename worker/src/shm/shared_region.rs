//! A region of memory shared by the master and every worker: a memfd the master creates and
//! sizes once, mapped by each process it hands the descriptor to (and read-only by `supervisor
//! status`), and accessed only through atomics, so that a process killed at any instruction
//! leaves nothing locked or half written.
//!
//! Owns the system calls and the pointer arithmetic for the scoreboard (`scoreboard`) and the
//! rate table (`ratelimit`): both describe their layout as offsets and read it through
//! [`Region::get`], which checks bounds and alignment, so the unsafe code of shared memory lives
//! here alone. What may live in a region is marked [`Shared`].

#![allow(unsafe_code)]

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// A type that may be read from shared memory.
///
/// # Safety
///
/// Every bit pattern of the type's size is a valid value (a fresh region is zeroed by the kernel,
/// and another process may have written anything), and every field is an atomic (or an array or
/// `#[repr(C)]` struct of them), so that shared references to it are sound while other processes
/// write to it.
pub unsafe trait Shared: Sync {}

// SAFETY: an atomic integer: any bit pattern is valid, and it is made for shared access.
unsafe impl Shared for AtomicU64 {}

/// A mapped region. Cheap to share: every method takes `&self`.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only ever accessed through `get`, which hands out shared references to
// `Shared` types (atomics), and it stays mapped until drop.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Creates a zeroed region of `len` bytes, named `name` in `/proc/PID/fd` (master side).
    /// The descriptor is close-on-exec: the spawner passes it to each worker explicitly.
    pub fn create(name: &str, len: usize) -> io::Result<(Region, OwnedFd)> {
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).map_err(io::Error::from)?;
        let size = i64::try_from(len).map_err(|_| invalid("region too large"))?;
        nix::unistd::ftruncate(&fd, size).map_err(io::Error::from)?;
        let region = Region::map(&fd, len, true)?;
        Ok((region, fd))
    }

    /// Maps the whole of an existing region (worker side, or read-only for `supervisor status`).
    pub fn open(fd: impl AsFd, writable: bool) -> io::Result<Region> {
        let len = std::fs::File::from(fd.as_fd().try_clone_to_owned()?)
            .metadata()?
            .len();
        let len = usize::try_from(len).map_err(|_| invalid("region too large"))?;
        Region::map(fd, len, writable)
    }

    fn map(fd: impl AsFd, len: usize, writable: bool) -> io::Result<Region> {
        let size = NonZeroUsize::new(len).ok_or_else(|| invalid("empty region"))?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a descriptor we hold; no existing memory is aliased.
        // The region is only accessed through `get`.
        let base = unsafe { mmap(None, size, prot, MapFlags::MAP_SHARED, fd, 0) }
            .map_err(io::Error::from)?;
        Ok(Region {
            base: base.cast(),
            len,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The `T` at byte `offset`; panics if it does not lie inside the region or is misaligned
    /// for `T` (a layout mistake, never a run-time condition).
    pub fn get<T: Shared>(&self, offset: usize) -> &T {
        let end = offset.checked_add(std::mem::size_of::<T>());
        assert!(
            end.is_some_and(|end| end <= self.len),
            "shared region: {} bytes at {offset} do not fit in {}",
            std::mem::size_of::<T>(),
            self.len
        );
        // SAFETY: inside the mapping (checked above), which lives as long as `self`.
        let p = unsafe { self.base.as_ptr().add(offset) };
        assert!(
            p.cast::<T>().is_aligned(),
            "shared region: offset {offset} misaligned"
        );
        // SAFETY: in bounds and aligned (checked above); `T: Shared` makes any content a valid
        // `T` and shared references to it sound while other processes write.
        unsafe { &*p.cast::<T>() }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned; no reference into the region
        // outlives `self`, since `get` borrows `self`.
        unsafe {
            let _ = munmap(self.base.cast(), self.len);
        }
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn what_one_mapping_writes_another_reads_and_out_of_range_panics() {
        let (region, fd) = Region::create("supervisor-test-region", 64).unwrap();
        let reader = Region::open(&fd, false).unwrap();
        assert_eq!(reader.len(), 64);
        region.get::<AtomicU64>(56).store(7, Ordering::Relaxed);
        assert_eq!(reader.get::<AtomicU64>(56).load(Ordering::Relaxed), 7);
        assert_eq!(reader.get::<AtomicU64>(0).load(Ordering::Relaxed), 0);
        let past_end =
            std::panic::catch_unwind(|| region.get::<AtomicU64>(60).load(Ordering::Relaxed));
        assert!(past_end.is_err());
        let misaligned =
            std::panic::catch_unwind(|| region.get::<AtomicU64>(4).load(Ordering::Relaxed));
        assert!(misaligned.is_err());
    }
}
