//! A shard's own handles to the segments its keys' records live in, so a claim reads a
//! record without the log's segment map.
//!
//! Every replay looks up the segment its record lives in. Through the log's map that costs a
//! read lock and an unlock (two atomic read-modify-writes) and a hash lookup, about a tenth
//! of a replay's instructions; here, under the shard lock the claim already holds, it is a
//! compare. A dropped segment is marked so (`Segment::is_dropped`), and its handle then reads
//! as a miss: the cache answers as the map would. The sweep that follows every drop lets go
//! of such handles ([`SegmentCache::retain`]), so no mapping outlives its file for long.

use std::sync::Arc;

use crate::log::segment::Segment;

/// Handles kept per shard, placed by segment id: a store's live segments are few (a 64 MiB
/// segment holds ~200,000 completed keys), and consecutive ids fall in different places.
const WAYS: usize = 8;

#[derive(Default)]
pub struct SegmentCache {
    ways: [Option<Arc<Segment>>; WAYS],
}

impl SegmentCache {
    /// The place for segment `id`'s handle; it may hold another segment's, or a dropped one.
    pub fn way_mut(&mut self, id: u32) -> &mut Option<Arc<Segment>> {
        &mut self.ways[id as usize % WAYS]
    }

    /// Lets go of every handle to a segment `is_live` refuses (after a drop).
    pub fn retain(&mut self, is_live: impl Fn(u32) -> bool) {
        for way in &mut self.ways {
            if way.as_ref().is_some_and(|s| !is_live(s.id())) {
                *way = None;
            }
        }
    }

    /// How many handles are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ways.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::io::Io;
    use crate::io::sim::SimDisk;
    use crate::log::segment::SegmentHeader;

    fn segment(disk: &SimDisk, id: u32) -> Arc<Segment> {
        let header = SegmentHeader { id, bucket_start_ms: 0, bucket_end_ms: 60_000, created_at_ms: 0, rebuilt: false };
        Arc::new(Segment::create(disk, Path::new("/store"), header, 4096, 4096, false).unwrap())
    }

    #[test]
    fn ids_sharing_a_way_replace_each_other_and_retain_lets_go_of_refused_ones() {
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/store")).unwrap();
        let mut cache = SegmentCache::default();
        let (one, two, other_way) = (segment(&disk, 1), segment(&disk, 1 + WAYS as u32), segment(&disk, 2));
        cache.way_mut(1).replace(one.clone());
        cache.way_mut(2).replace(other_way.clone());
        assert_eq!(cache.len(), 2);
        cache.way_mut(two.id()).replace(two.clone());
        assert_eq!(cache.len(), 2, "segment {} took segment 1's place", two.id());
        assert_eq!(Arc::strong_count(&one), 1, "the replaced handle was let go");

        cache.retain(|id| id != 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(Arc::strong_count(&other_way), 1, "the refused handle was let go");
        assert_eq!(cache.way_mut(two.id()).as_ref().map(|s| s.id()), Some(two.id()), "the kept handle stays");
    }
}
