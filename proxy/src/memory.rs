//! Gives freed heap memory back to the system.
//!
//! glibc's allocator keeps the memory of freed allocations in its arenas and only
//! returns the top of a heap by itself. After a burst of connections (thousands of
//! held longpolls, say) closes, the ~47 KiB each one used stays resident: 5 000 held
//! requests left portier at 241 MiB RSS after they closed, where it started at 12.
//! Once a second the control plane reads how much free memory the arenas hold; when
//! that grew by more than [`TRIM_ABOVE`] over its lowest point since the last trim,
//! it has glibc hand the free pages back (`malloc_trim`, which `madvise`s free pages
//! anywhere in the heaps). The check reads counters; the trim runs only after a
//! burst of memory was freed.

/// Growth of the allocator's free bytes that triggers giving them back.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
const TRIM_ABOVE: usize = 16 * 1024 * 1024;

/// Watches the allocator's free memory; see the module documentation.
#[derive(Debug, Default)]
pub struct Trimmer {
    /// Lowest free byte count seen since the last trim.
    #[cfg_attr(
        not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))),
        allow(dead_code)
    )]
    low: usize,
}

impl Trimmer {
    /// Returns free heap pages to the system when more than [`TRIM_ABOVE`] bytes were
    /// freed since the free count was last at its lowest. Returns whether it trimmed.
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
    pub fn tick(&mut self) -> bool {
        // SAFETY: mallinfo2 and malloc_trim are thread-safe glibc calls that take no
        // pointers; they lock each arena while they read or trim it.
        let free = unsafe { libc::mallinfo2() }.fordblks;
        self.low = self.low.min(free);
        if free <= self.low.saturating_add(TRIM_ABOVE) {
            return false;
        }
        // SAFETY: as above.
        unsafe { libc::malloc_trim(0) };
        // Trimmed pages still count as free: the next trim waits for new frees.
        self.low = free;
        tracing::debug!(free_bytes = free, "returned free heap memory to the system");
        true
    }

    /// Other allocators (mimalloc, musl's) return memory by themselves.
    #[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
    pub fn tick(&mut self) -> bool {
        false
    }
}

#[cfg(all(
    test,
    target_os = "linux",
    target_env = "gnu",
    not(feature = "mimalloc")
))]
mod tests {
    use super::*;

    /// 4 000 allocations of 16 KiB, every other one kept so that the freed half
    /// (32 MiB) cannot merge into the heap top and be returned by free() itself.
    fn free_32_mib_in_the_middle() -> Vec<Vec<u8>> {
        let mut blocks: Vec<Vec<u8>> = (0..4000u32)
            .map(|i| vec![(i % 251) as u8; 16 * 1024])
            .collect();
        let kept = blocks.iter_mut().step_by(2).map(std::mem::take).collect();
        drop(blocks);
        kept
    }

    #[test]
    fn trims_after_each_burst_of_frees_and_not_in_between() {
        let mut t = Trimmer { low: usize::MAX };
        let _ = t.tick();
        assert!(!t.tick(), "nothing freed since the last look");
        let kept = free_32_mib_in_the_middle();
        assert!(t.tick(), "32 MiB freed in the middle of the heap");
        assert!(!t.tick(), "the trimmed memory is not trimmed again");
        // The freed memory is used again, then freed again: trimmed again.
        let again = free_32_mib_in_the_middle();
        let _ = t.tick();
        drop(again);
        drop(kept);
        assert!(t.tick(), "a second burst of frees is trimmed too");
    }
}
