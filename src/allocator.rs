//! The allocator of both binaries (the CLI/daemon and the bench suite, which must measure what
//! ships): mimalloc, without transparent huge pages. Not part of the pipeline.
//!
//! mimalloc asks the kernel for huge pages on its 1 GiB arenas (`madvise(MADV_HUGEPAGE)`, its
//! `allow_thp` option, on by default), so each first touch of a 2 MB region faults in and
//! zeroes a whole huge page, again after every purge. Measured on a 100k-domain compile
//! (BENCHMARKS.md): 57% of the time in the kernel's `clear_page_erms`; load 7.5 s → 0.82 s,
//! render 2.8 s → 0.45 s, plan 4.4 s → 0.40 s without them.

/// mimalloc's `allow_thp` option: its index in mimalloc v3's `mi_option_t`.
pub const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Turns mimalloc's huge pages off. Runs from `.init_array` (see `use_mimalloc!`), before any
/// allocation reserves an arena: a setting made in `main` would come after the Rust runtime's
/// first allocations.
pub extern "C" fn no_transparent_huge_pages() {
    // SAFETY: sets one option before `main`, while the process has one thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
}

/// mimalloc as the global allocator, without transparent huge pages.
#[macro_export]
macro_rules! use_mimalloc {
    () => {
        #[global_allocator]
        static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

        #[used]
        #[unsafe(link_section = ".init_array")]
        static NO_TRANSPARENT_HUGE_PAGES: extern "C" fn() =
            $crate::allocator::no_transparent_huge_pages;
    };
}
