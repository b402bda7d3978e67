//! A hint to the CPU to start loading a cache line now, so that a batch of lookups waits for
//! its memory misses side by side instead of one after the other (`Store::claim_many`).

/// Asks the CPU to bring the cache line holding `ptr` into cache. Never faults and never
/// changes what the program computes: any address, even a dangling one, is allowed.
#[inline(always)]
#[allow(unsafe_code, reason = "a CPU hint through an intrinsic, with its SAFETY comment")]
pub fn prefetch_read(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it reads nothing into registers, raises no fault for any
    // address (unmapped or freed memory included) and has no effect the program can observe
    // other than timing. SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}
