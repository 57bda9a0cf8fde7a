//! Gives freed heap memory back to the system.
//!
//! Allocators keep the memory of freed allocations for reuse. After a burst of
//! connections (thousands of held longpolls, say) closes, what each one used stays
//! resident: with glibc's malloc, 5 000 held requests left portier at 241 MiB RSS after
//! they closed, where it started at 12; mimalloc (the default allocator) purges freed
//! pages only when the thread that freed them allocates again, so an idle proxy
//! thread kept 92 MiB after 5 000 held longpolls closed.
//!
//! The control plane calls [`Trimmer::tick`] once a second with the number of requests
//! in flight. Three things make it hand the free pages back (glibc: `malloc_trim`, which
//! `madvise`s free pages anywhere in the heaps; mimalloc: `mi_collect(true)`, which
//! purges the free ranges of every arena, where the pages any thread emptied went):
//! - a configuration was loaded, at start-up or by a reload: parsing 10 000 tenants
//!   leaves ~11 MiB freed behind it (36 MiB at rest instead of 25 with mimalloc);
//! - a burst ended: [`BURST`] fewer requests in flight than the peak since the last
//!   trim (one atomic read per second; the trim costs milliseconds, once per burst);
//! - every [`LOOK_EVERY`] ticks, for what the in-flight count does not see (idle
//!   keep-alive connections closing, say): the resident set grew by [`TRIM_ABOVE`]
//!   since the last trim and the allocator holds at least that much free memory
//!   (where it can tell: mimalloc cannot, and is collected then). Reading glibc's free
//!   bytes walks the allocator's free lists under its locks — about 4 ms with 100 000
//!   free chunks — so it is done only then, at most once a minute. (The free byte
//!   count alone cannot tell: trimmed pages still count as free, so memory used and
//!   freed again between two looks would not show.)

/// mimalloc as Rust's global allocator, called the way C calls it.
///
/// The `mimalloc` crate's `MiMalloc` passes every allocation to `mi_malloc_aligned`,
/// whose fast path covers blocks up to 1 KiB only: a larger block with any alignment
/// takes its generic aligned path, which over-allocates unless the block size is a
/// power of two (mimalloc v3 `src/alloc-aligned.c`). A proxied request allocates
/// several such blocks (its boxed futures, header buffers). Every mimalloc block is
/// aligned to a word at least, as any `malloc`'s is, so an alignment up to a word goes
/// to `mi_malloc`/`mi_realloc`; only larger alignments take the aligned calls.
#[cfg(feature = "mimalloc")]
pub struct Mimalloc;

#[cfg(feature = "mimalloc")]
const WORD: usize = std::mem::size_of::<usize>();

#[cfg(feature = "mimalloc")]
// SAFETY: every call forwards to mimalloc, which returns blocks of at least the size
// asked, aligned to a word at least (or to `layout.align()` through the aligned
// calls), null on failure, and frees any block of its own with `mi_free`.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        if layout.align() <= WORD {
            // SAFETY: see the impl; the size is non-zero (GlobalAlloc's contract).
            unsafe { mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: as above, with a power-of-two alignment (Layout's invariant).
            unsafe { mi_malloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        if layout.align() <= WORD {
            // SAFETY: as for `alloc`.
            unsafe { mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: as for `alloc`.
            unsafe { mi_zalloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        if layout.align() <= WORD {
            // SAFETY: `ptr` came from this allocator with `layout`; the new size is
            // non-zero (GlobalAlloc's contract).
            unsafe { mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: as above; the alignment is kept.
            unsafe { mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast() }
        }
    }
}

/// Requests that must have ended since the peak for a trim.
pub const BURST: u64 = 256;
/// Ticks (seconds) between two looks at the allocator's free bytes.
pub const LOOK_EVERY: u64 = 60;
/// Growth of the resident set, and free bytes held, that make a look trim.
pub const TRIM_ABOVE: usize = 16 * 1024 * 1024;

/// What triggered a trim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    BurstEnded,
    ResidentGrew,
    ConfigLoaded,
}

/// Decides when to give freed memory back; see the module documentation.
#[derive(Debug)]
pub struct Trimmer {
    look_every: u64,
    ticks: u64,
    peak_inflight: u64,
    /// Resident set size right after the last trim.
    rss_base: usize,
    /// A configuration was loaded since the last tick: its parse (and the snapshot it
    /// replaced, once the last request holding it ends) left freed memory behind.
    config_loaded: bool,
}

impl Default for Trimmer {
    fn default() -> Self {
        Trimmer {
            look_every: LOOK_EVERY,
            ticks: 0,
            peak_inflight: 0,
            rss_base: 0,
            // The configuration read at start-up.
            config_loaded: true,
        }
    }
}

impl Trimmer {
    /// A configuration was (re)loaded: the next tick trims.
    pub fn config_loaded(&mut self) {
        self.config_loaded = true;
    }

    /// One tick of the control plane, with the requests now in flight. Returns what
    /// made it trim, if it did.
    pub fn tick(&mut self, inflight: u64) -> Option<Trim> {
        if !alloc::SUPPORTED {
            return None;
        }
        self.ticks += 1;
        self.peak_inflight = self.peak_inflight.max(inflight);
        if std::mem::take(&mut self.config_loaded) {
            self.trim(inflight);
            tracing::debug!("a configuration was loaded: heap trimmed");
            return Some(Trim::ConfigLoaded);
        }
        if self.peak_inflight - inflight >= BURST {
            self.trim(inflight);
            tracing::debug!(inflight, "a burst of requests ended: heap trimmed");
            return Some(Trim::BurstEnded);
        }
        if !self.ticks.is_multiple_of(self.look_every)
            || resident_bytes() <= self.rss_base.saturating_add(TRIM_ABOVE)
        {
            return None;
        }
        let free = alloc::free_bytes();
        if free.is_some_and(|free| free <= TRIM_ABOVE) {
            // In use, not free: look again next time.
            return None;
        }
        self.trim(inflight);
        tracing::debug!(
            free_bytes = free,
            "resident memory grew and may be free: heap trimmed"
        );
        Some(Trim::ResidentGrew)
    }

    /// Hands the free pages back; the peak and the resident base start again from now.
    fn trim(&mut self, inflight: u64) {
        alloc::trim();
        self.peak_inflight = inflight;
        self.rss_base = resident_bytes();
    }
}

/// This process's resident set size in bytes (0 if /proc cannot be read).
fn resident_bytes() -> usize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0);
    pages * alloc::page_size()
}

/// mimalloc (the default global allocator, `main.rs`): `mi_collect`.
#[cfg(feature = "mimalloc")]
mod alloc {
    pub const SUPPORTED: bool = true;

    /// mimalloc keeps no count of its free bytes (without its statistics build).
    pub fn free_bytes() -> Option<usize> {
        None
    }

    pub fn trim() {
        // SAFETY: mi_collect takes no pointer. With `force` it collects the calling
        // thread's heap and purges the free ranges of every arena — where the pages
        // any thread emptied went — at once instead of after `purge_delay`
        // (mimalloc v3 src/theap.c, `mi_theap_collect_ex`).
        unsafe { libmimalloc_sys::mi_collect(true) };
    }

    pub fn page_size() -> usize {
        super::system_page_size()
    }
}

/// glibc: the arenas' free bytes and `malloc_trim`.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
mod alloc {
    pub const SUPPORTED: bool = true;

    pub fn free_bytes() -> Option<usize> {
        // SAFETY: mallinfo2 is a thread-safe glibc call that takes no pointer; it
        // locks each arena while it reads it.
        Some(unsafe { libc::mallinfo2() }.fordblks)
    }

    pub fn trim() {
        // SAFETY: malloc_trim is thread-safe and takes no pointer.
        unsafe { libc::malloc_trim(0) };
    }

    pub fn page_size() -> usize {
        super::system_page_size()
    }
}

/// Other allocators (musl's) return memory by themselves.
#[cfg(not(any(feature = "mimalloc", all(target_os = "linux", target_env = "gnu"))))]
mod alloc {
    pub const SUPPORTED: bool = false;
    pub fn free_bytes() -> Option<usize> {
        None
    }
    pub fn trim() {}
    pub fn page_size() -> usize {
        4096
    }
}

#[cfg(any(feature = "mimalloc", all(target_os = "linux", target_env = "gnu")))]
fn system_page_size() -> usize {
    // SAFETY: sysconf takes no pointer.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

#[cfg(all(
    test,
    any(feature = "mimalloc", all(target_os = "linux", target_env = "gnu"))
))]
mod tests {
    use super::*;

    /// 64 MiB touched in 16 KiB blocks, then freed so that the allocator keeps it:
    /// glibc returns a free heap top by itself, so there every other block is freed
    /// (32 MiB in the middle); mimalloc purges a page only once all of it is free,
    /// and only after `purge_delay` (1 s), so there all of it is freed.
    /// The tests that read the process's resident size take turns: each would see the
    /// other's 64 MiB.
    static RESIDENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Returns the blocks kept.
    fn touch_and_free_64_mib() -> Vec<Vec<u8>> {
        let mut blocks: Vec<Vec<u8>> = (0..4096u32)
            .map(|i| vec![(i % 251) as u8; 16 * 1024])
            .collect();
        if cfg!(feature = "mimalloc") {
            return Vec::new();
        }
        let kept = blocks.iter_mut().step_by(2).map(std::mem::take).collect();
        drop(blocks);
        kept
    }

    #[test]
    fn a_trim_gives_the_freed_pages_back() {
        let _turn = RESIDENT.lock().unwrap_or_else(|e| e.into_inner());
        let kept = touch_and_free_64_mib();
        let before = resident_bytes();
        alloc::trim();
        let after = resident_bytes();
        assert!(
            before >= after + 16 * 1024 * 1024,
            "resident {} MiB before the trim, {} MiB after",
            before >> 20,
            after >> 20
        );
        drop(kept);
    }

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
    fn trims_at_the_tick_after_a_configuration_is_loaded() {
        let mut t = Trimmer::default();
        assert_eq!(t.tick(0), Some(Trim::ConfigLoaded), "the start-up load");
        assert_eq!(t.tick(0), None);
        t.config_loaded();
        assert_eq!(t.tick(5), Some(Trim::ConfigLoaded), "a reload");
        assert_eq!(t.tick(5), None);
    }

    #[test]
    fn trims_when_a_burst_of_requests_ends() {
        let mut t = Trimmer {
            config_loaded: false,
            ..Trimmer::default()
        };
        for inflight in [0, 100, 300, 280, 200] {
            assert_eq!(t.tick(inflight), None, "at {inflight} in flight");
        }
        // 300 at the peak, 40 now: 260 ended.
        assert_eq!(t.tick(40), Some(Trim::BurstEnded));
        // The peak restarts from 40.
        assert_eq!(t.tick(10), None);
        assert_eq!(t.tick(290), None);
        assert_eq!(t.tick(30), Some(Trim::BurstEnded));
    }

    #[test]
    fn looks_only_every_look_every_ticks_and_trims_what_grew_and_is_free() {
        let _turn = RESIDENT.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = Trimmer {
            look_every: 3,
            config_loaded: false,
            ..Trimmer::default()
        };
        let _ = t.tick(0); // tick 1: no look
        let _ = t.tick(0); // tick 2: no look
        let _ = t.tick(0); // tick 3: a look, sets the resident base if it trims
        let _ = t.tick(0);
        let _ = t.tick(0);
        let _ = t.tick(0); // tick 6: same
                           // 64 MiB touched (resident), half of it freed in the middle of the heap.
        let kept = free_32_mib_in_the_middle();
        assert_eq!(t.tick(0), None, "tick 7 does not look");
        assert_eq!(t.tick(0), None, "tick 8 does not look");
        assert_eq!(
            t.tick(0),
            Some(Trim::ResidentGrew),
            "tick 9 looks and trims"
        );
        // Nothing grew since: the next look does not trim.
        for _ in 0..3 {
            assert_eq!(t.tick(0), None);
        }
        // The trimmed pages are used again (resident again) and half of it freed
        // again in the middle: trimmed again.
        let kept_too = free_32_mib_in_the_middle();
        for _ in 0..2 {
            assert_eq!(t.tick(0), None);
        }
        assert_eq!(t.tick(0), Some(Trim::ResidentGrew));
        drop(kept_too);
        drop(kept);
    }
}
