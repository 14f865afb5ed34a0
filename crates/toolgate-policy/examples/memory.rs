//! What a loaded policy set keeps in memory, step by step (bytes live, counted by the allocator):
//! `cargo run --release -p toolgate-policy --example memory [DIR]`.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now =
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed) + layout.size() as isize;
        PEAK.fetch_max(now, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mb(n: isize) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

fn main() {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: memory DIR (a policy directory)"),
    );
    let start = LIVE.load(Ordering::Relaxed);
    let mut cache = toolgate_policy::LoadCache::default();
    let loaded = toolgate_policy::load_dir_cached(&dir, &mut cache).unwrap();
    println!(
        "loaded (+cache): {} (peak {})",
        mb(LIVE.load(Ordering::Relaxed) - start),
        mb(PEAK.load(Ordering::Relaxed) - start)
    );
    let engine = toolgate_policy::PolicyEngine::from_loaded(loaded).unwrap();
    println!(
        "engine (+cache): {}",
        mb(LIVE.load(Ordering::Relaxed) - start)
    );
    drop(cache);
    println!("engine alone: {}", mb(LIVE.load(Ordering::Relaxed) - start));
    drop(engine);
    println!("after drop: {}", mb(LIVE.load(Ordering::Relaxed) - start));
}
