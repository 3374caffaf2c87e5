//! The image worker's decoding stays within the memory its plan announces, on hostile inputs.
//!
//! A counting allocator measures the bytes the process holds at its peak while one image is rendered;
//! the worker reserves `Plan::peak_bytes` of its memory budget before decoding, so a plan that
//! under-states the real peak would let `IMAGE_MEMORY_LIMIT_MB` be overrun. This binary holds a
//! single test, so nothing else allocates beside the measurement.

// A global allocator cannot be written without `unsafe`; it only passes calls on to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use benches::hostile::{Expect, corpus};
use image_worker::process::{self, DEFAULT_VARIANTS, DecodeLimits};

struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only counters are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let held = HELD.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(held, Ordering::SeqCst);
        // SAFETY: same layout as asked for.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let held = HELD.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(held, Ordering::SeqCst);
        // SAFETY: same layout as asked for.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Old and new blocks may both be held during the move.
        let held = HELD.fetch_add(new_size, Ordering::SeqCst) + new_size;
        PEAK.fetch_max(held, Ordering::SeqCst);
        // SAFETY: `ptr` came from this allocator with this layout.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        HELD.fetch_sub(layout.size(), Ordering::SeqCst);
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn decoding_stays_within_its_plan_and_hostile_inputs_fail_before_allocating() {
    let limits = DecodeLimits::default();
    for input in corpus(6.0) {
        let before = HELD.load(Ordering::SeqCst);
        PEAK.store(before, Ordering::SeqCst);
        let result = process::render(&input.bytes, limits, &DEFAULT_VARIANTS);
        let used = PEAK.load(Ordering::SeqCst) - before;
        let mib = |b: usize| b as f64 / f64::from(1 << 20);
        match (input.expect, result) {
            (Expect::Ready, Ok(variants)) => {
                assert_eq!(variants.len(), DEFAULT_VARIANTS.len(), "{}", input.name);
                let plan = process::plan(&input.bytes, limits, &DEFAULT_VARIANTS).unwrap();
                println!(
                    "{}: peak {:.1} MiB, plan {:.1} MiB",
                    input.name,
                    mib(used),
                    mib(plan.peak_bytes as usize)
                );
                assert!(
                    used as u64 <= plan.peak_bytes,
                    "{}: held {:.1} MiB at its peak, its plan says {:.1} MiB",
                    input.name,
                    mib(used),
                    mib(plan.peak_bytes as usize)
                );
                // The 16-bit RGBA source (8 bytes a pixel) is never copied whole: it is turned
                // into 8-bit RGB (3 bytes) and dropped before anything is rotated.
                if input.name.starts_with("png16") {
                    let pixels = (plan.width * plan.height) as usize;
                    assert!(
                        used <= pixels * 12,
                        "{}: {:.1} bytes a pixel",
                        input.name,
                        used as f64 / pixels as f64
                    );
                }
            }
            (Expect::Fails(class), Err(failure)) => {
                assert_eq!(failure.class, class, "{}: {}", input.name, failure.message);
                assert!(!failure.retryable, "{}", input.name);
                // Refused on the header: nothing the size of the declared pixels was allocated.
                assert!(
                    used < 4 << 20,
                    "{}: {:.1} MiB allocated before it was refused",
                    input.name,
                    mib(used)
                );
            }
            (expect, Ok(_)) => panic!("{} rendered, expected {expect:?}", input.name),
            (expect, Err(f)) => panic!(
                "{} failed with {} ({}), expected {expect:?}",
                input.name, f.class, f.message
            ),
        }
    }
}
