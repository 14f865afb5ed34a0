//! Usage counters that policies read (`context.usage.<name>`): calls (or a summed argument)
//! per key in a sliding window, approximated by two fixed windows, the previous one weighted
//! by how much of it the sliding window still covers, rounded up (so a limit is never passed).
//! A call reserves its amount atomically and sees the value before it: concurrent calls see
//! each other's reservations, and a budget never overshoots. A call that is denied or never
//! reached the upstream gives its amount back.

use serde::{Deserialize, Serialize};

/// One counter a call touches: its key (name and the key parts), window and amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub key: String,
    pub window_ms: u64,
    pub amount: i64,
    /// The fixed window the amount went into (given back there).
    pub window: u64,
}

/// A counter's two windows as a call found them (before its own amount).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Windows {
    pub current: i64,
    pub previous: i64,
}

impl Windows {
    /// The sliding value at `now_ms`, for a counter whose current window is `window`.
    pub fn value_at(&self, window: u64, window_ms: u64, now_ms: u64) -> i64 {
        let start = window * window_ms;
        let (current, previous) = match now_ms.saturating_sub(start) / window_ms.max(1) {
            0 => (self.current, self.previous),
            // The window moved on: what was current is now the previous one.
            1 => (0, self.current),
            _ => (0, 0),
        };
        let into = (now_ms.saturating_sub(start)) % window_ms.max(1);
        let left = window_ms - into;
        // previous × left / window, rounded up: the limit is never passed for rounding.
        let weighted = (previous.max(0) as u128 * left as u128).div_ceil(window_ms.max(1) as u128);
        current + weighted as i64
    }
}

/// Which fixed window `now_ms` falls in.
pub fn window_of(now_ms: u64, window_ms: u64) -> u64 {
    now_ms / window_ms.max(1)
}

/// Counters in this process (the `memory` store).
#[derive(Default)]
pub struct MemoryCounters {
    counts: dashmap::DashMap<String, [(u64, i64); 2]>,
}

impl MemoryCounters {
    /// Adds each reservation's amount; the windows each counter had before.
    pub fn reserve(&self, reservations: &[Reservation]) -> Vec<Windows> {
        reservations
            .iter()
            .map(|r| {
                let mut entry = self.counts.entry(r.key.clone()).or_insert([(0, 0); 2]);
                let slots = entry.value_mut();
                let before = windows(slots, r.window);
                add(slots, r.window, r.amount);
                before
            })
            .collect()
    }

    pub fn release(&self, reservations: &[Reservation]) {
        for r in reservations {
            if let Some(mut entry) = self.counts.get_mut(&r.key) {
                add(entry.value_mut(), r.window, -r.amount);
            }
        }
    }
}

/// The counts of `window` and the one before it.
fn windows(slots: &[(u64, i64); 2], window: u64) -> Windows {
    let count = |w: u64| slots.iter().find(|(at, _)| *at == w).map_or(0, |(_, n)| *n);
    Windows {
        current: count(window),
        previous: window.checked_sub(1).map_or(0, count),
    }
}

fn add(slots: &mut [(u64, i64); 2], window: u64, amount: i64) {
    if let Some(slot) = slots.iter_mut().find(|(at, _)| *at == window) {
        slot.1 += amount;
        return;
    }
    // A new window takes the older slot (windows before the previous one count no more).
    let oldest = if slots[0].0 <= slots[1].0 { 0 } else { 1 };
    slots[oldest] = (window, amount);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sliding_value_weights_the_previous_window_and_rounds_up() {
        let w = Windows {
            current: 10,
            previous: 60,
        };
        // A quarter into window 5 of 60 s: three quarters of the previous still count.
        assert_eq!(w.value_at(5, 60_000, 5 * 60_000 + 15_000), 10 + 45);
        // 1 ms in: all of the previous, rounded up.
        assert_eq!(w.value_at(5, 60_000, 5 * 60_000 + 1), 10 + 60);
        // The next window: what was current weighs as the previous one did.
        assert_eq!(w.value_at(5, 60_000, 6 * 60_000 + 30_000), 5);
        assert_eq!(w.value_at(5, 60_000, 7 * 60_000 + 1), 0);
    }

    #[test]
    fn reservations_are_seen_by_the_next_call_and_given_back() {
        let counters = MemoryCounters::default();
        let r = Reservation {
            key: "k".into(),
            window_ms: 60_000,
            amount: 3,
            window: 7,
        };
        assert_eq!(counters.reserve(std::slice::from_ref(&r))[0].current, 0);
        assert_eq!(counters.reserve(std::slice::from_ref(&r))[0].current, 3);
        counters.release(std::slice::from_ref(&r));
        assert_eq!(counters.reserve(std::slice::from_ref(&r))[0].current, 3);
        let next = Reservation { window: 8, ..r };
        let seen = counters.reserve(std::slice::from_ref(&next))[0];
        assert_eq!(
            seen,
            Windows {
                current: 0,
                previous: 6
            }
        );
    }
}
