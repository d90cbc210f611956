//! Offset watermark tracking for one partition.
//!
//! Records are consumed in offset order (with gaps: compaction, transaction
//! markers) and finish in any order. The committable position is the offset
//! of the oldest record not yet final, or one past the newest consumed record
//! when all are final: committing it never skips an unfinished record.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// (offset, final) for every consumed record not yet below the watermark.
    window: VecDeque<(i64, bool)>,
    /// One past the newest offset consumed.
    next: Option<i64>,
}

impl OffsetTracker {
    /// Records that `offset` was consumed. Offsets must increase; a repeated
    /// or older offset (a re-fetch after a seek) is ignored and reported false.
    pub fn consumed(&mut self, offset: i64) -> bool {
        if self.next.is_some_and(|n| offset < n) {
            return false;
        }
        self.window.push_back((offset, false));
        self.next = Some(offset + 1);
        true
    }

    /// Marks `offset` final; returns false when it is not tracked.
    pub fn finished(&mut self, offset: i64) -> bool {
        let Ok(i) = self.window.binary_search_by_key(&offset, |&(o, _)| o) else {
            return false;
        };
        self.window[i].1 = true;
        while self.window.front().is_some_and(|&(_, done)| done) {
            self.window.pop_front();
        }
        true
    }

    /// The offset to commit (the next record to read after a restart), or
    /// `None` when nothing was consumed yet.
    pub fn committable(&self) -> Option<i64> {
        match self.window.front() {
            Some(&(oldest, _)) => Some(oldest),
            None => self.next,
        }
    }

    /// Records consumed but not final.
    pub fn pending(&self) -> usize {
        self.window.iter().filter(|(_, done)| !done).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_consumed_means_nothing_to_commit() {
        assert_eq!(OffsetTracker::default().committable(), None);
    }

    #[test]
    fn the_watermark_waits_for_the_oldest_unfinished_record() {
        let mut t = OffsetTracker::default();
        for o in [10, 11, 12, 15] {
            assert!(t.consumed(o));
        }
        assert_eq!(t.committable(), Some(10));
        t.finished(11);
        t.finished(15);
        assert_eq!(t.committable(), Some(10), "10 is still in flight");
        t.finished(10);
        assert_eq!(t.committable(), Some(12));
        t.finished(12);
        assert_eq!(t.committable(), Some(16), "all final: one past the newest");
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn out_of_order_and_unknown_offsets_are_handled() {
        let mut t = OffsetTracker::default();
        t.consumed(5);
        assert!(!t.consumed(5), "a repeated offset is ignored");
        assert!(!t.consumed(3), "an older offset is ignored");
        assert!(!t.finished(4));
        assert!(t.finished(5));
        assert_eq!(t.committable(), Some(6));
    }

    #[test]
    fn random_completion_orders_never_pass_an_unfinished_offset() {
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let mut t = OffsetTracker::default();
            let offsets: Vec<i64> = (0..50).map(|i| i * 2).collect();
            for &o in &offsets {
                t.consumed(o);
            }
            let mut order = offsets.clone();
            order.shuffle(&mut rng);
            let mut done = std::collections::BTreeSet::new();
            for o in order {
                t.finished(o);
                done.insert(o);
                let c = t.committable().unwrap();
                assert!(offsets.iter().filter(|&&x| x < c).all(|x| done.contains(x)));
            }
            assert_eq!(t.committable(), Some(99));
        }
    }
}
