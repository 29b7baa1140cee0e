//! The recursive watch table: which inotify watch is which directory.
//!
//! What it is: a table made once at start, sized from `limits.max_watches`,
//! that maps a watch descriptor to a slot holding the directory's parent slot
//! and its name (bytes, any encoding). Names live in one byte arena that is
//! compacted in place when it fills. A directory's full path is rebuilt on
//! demand into a caller's fixed buffer by walking up the parents, so a
//! directory renamed inside the tree only needs its own slot updated: every
//! path below it follows. Nothing here allocates after `new`.
//! What it is not: the inotify instance, or policy about what to watch; the
//! relocate service decides that and keeps this table in step with the kernel.

/// A slot index. The root of a tree is a slot whose parent is [`NO_SLOT`].
pub type Slot = u32;
pub const NO_SLOT: Slot = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Entry {
    wd: i32,
    parent: Slot,
    name_at: u32,
    name_len: u16,
    live: bool,
}

/// Why a directory could not be added to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Every slot (`limits.max_watches`) is in use.
    Slots,
    /// The name arena is full even after compaction.
    Names,
}

pub struct WatchTable {
    entries: Vec<Entry>,
    free: Vec<Slot>,
    by_wd: WdMap,
    names: Vec<u8>,
    /// Scratch for compaction: live slots in arena order.
    order: Vec<Slot>,
    live: usize,
}

/// Average directory-name bytes budgeted per watch in the arena.
const NAME_BYTES_PER_WATCH: usize = 40;

impl WatchTable {
    /// A table for at most `max_watches` directories.
    pub fn new(max_watches: usize) -> WatchTable {
        let max = max_watches.max(1);
        WatchTable {
            entries: Vec::with_capacity(max),
            free: Vec::with_capacity(max),
            by_wd: WdMap::new(max),
            names: Vec::with_capacity((max * NAME_BYTES_PER_WATCH).max(64 * 1024)),
            order: Vec::with_capacity(max),
            live: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Records that watch `wd` is directory `name` inside `parent` (or the
    /// tree's root, with `parent == NO_SLOT` and `name` its full path). If
    /// `wd` is already known (inotify returns the same wd for the same
    /// directory), its slot is updated and returned.
    pub fn insert(&mut self, wd: i32, parent: Slot, name: &[u8]) -> Result<Slot, Full> {
        if let Some(slot) = self.by_wd.get(wd) {
            self.rename(slot, parent, name)?;
            return Ok(slot);
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.entries.len() < self.entries.capacity() => {
                self.entries.push(Entry {
                    wd: -1,
                    parent: NO_SLOT,
                    name_at: 0,
                    name_len: 0,
                    live: false,
                });
                (self.entries.len() - 1) as Slot
            }
            None => return Err(Full::Slots),
        };
        let (name_at, name_len) = match self.store_name(name) {
            Ok(n) => n,
            Err(e) => {
                self.free.push(slot);
                return Err(e);
            }
        };
        self.entries[slot as usize] = Entry {
            wd,
            parent,
            name_at,
            name_len,
            live: true,
        };
        self.by_wd.insert(wd, slot);
        self.live += 1;
        Ok(slot)
    }

    /// Moves `slot` to `name` inside `new_parent` (a directory renamed).
    pub fn rename(&mut self, slot: Slot, new_parent: Slot, name: &[u8]) -> Result<(), Full> {
        let e = self.entries[slot as usize];
        if e.parent == new_parent && self.name(slot) == name {
            return Ok(());
        }
        // Mark the old name dead before storing the new one so compaction
        // may reclaim it.
        self.entries[slot as usize].live = false;
        let stored = self.store_name(name);
        self.entries[slot as usize].live = true;
        let (name_at, name_len) = stored?;
        let e = &mut self.entries[slot as usize];
        e.parent = new_parent;
        e.name_at = name_at;
        e.name_len = name_len;
        Ok(())
    }

    /// Forgets `slot`; returns its watch descriptor.
    pub fn remove(&mut self, slot: Slot) -> Option<i32> {
        let e = self.entries.get_mut(slot as usize)?;
        if !e.live {
            return None;
        }
        e.live = false;
        let wd = e.wd;
        self.by_wd.remove(wd);
        self.free.push(slot);
        self.live -= 1;
        Some(wd)
    }

    pub fn slot_of(&self, wd: i32) -> Option<Slot> {
        self.by_wd.get(wd)
    }

    pub fn wd_of(&self, slot: Slot) -> Option<i32> {
        self.entries
            .get(slot as usize)
            .filter(|e| e.live)
            .map(|e| e.wd)
    }

    pub fn parent(&self, slot: Slot) -> Slot {
        self.entries[slot as usize].parent
    }

    pub fn name(&self, slot: Slot) -> &[u8] {
        let e = &self.entries[slot as usize];
        &self.names[e.name_at as usize..e.name_at as usize + e.name_len as usize]
    }

    /// The live child of `parent` called `name`, if any.
    pub fn child(&self, parent: Slot, name: &[u8]) -> Option<Slot> {
        (0..self.entries.len() as Slot).find(|&s| {
            let e = &self.entries[s as usize];
            e.live && e.parent == parent && self.name(s) == name
        })
    }

    /// Calls `f` for every live slot whose ancestors include `top` (not
    /// `top` itself), deepest last.
    pub fn for_each_descendant(&self, top: Slot, mut f: impl FnMut(Slot)) {
        for s in 0..self.entries.len() as Slot {
            if !self.entries[s as usize].live || s == top {
                continue;
            }
            let mut p = self.entries[s as usize].parent;
            let mut hops = 0;
            while p != NO_SLOT && hops <= self.entries.len() {
                if p == top {
                    f(s);
                    break;
                }
                p = self.entries[p as usize].parent;
                hops += 1;
            }
        }
    }

    /// Writes the full path of `slot` into `buf` and returns its length, or
    /// `None` if it does not fit.
    pub fn path(&self, slot: Slot, buf: &mut [u8]) -> Option<usize> {
        // Measure first, then write each name at its place from the end.
        let mut len = 0usize;
        let mut s = slot;
        loop {
            let e = self.entries.get(s as usize)?;
            len += e.name_len as usize;
            if e.parent == NO_SLOT {
                break;
            }
            len += 1; // the '/'
            s = e.parent;
        }
        if len > buf.len() {
            return None;
        }
        let mut end = len;
        let mut s = slot;
        loop {
            let e = &self.entries[s as usize];
            let name = self.name(s);
            buf[end - name.len()..end].copy_from_slice(name);
            end -= name.len();
            if e.parent == NO_SLOT {
                break;
            }
            end -= 1;
            buf[end] = b'/';
            s = e.parent;
        }
        Some(len)
    }

    fn store_name(&mut self, name: &[u8]) -> Result<(u32, u16), Full> {
        let len = u16::try_from(name.len()).map_err(|_| Full::Names)?;
        if self.names.len() + name.len() > self.names.capacity() {
            self.compact();
            if self.names.len() + name.len() > self.names.capacity() {
                return Err(Full::Names);
            }
        }
        let at = self.names.len();
        self.names.extend_from_slice(name);
        Ok((at as u32, len))
    }

    /// Moves the live names to the front of the arena, in order.
    fn compact(&mut self) {
        self.order.clear();
        self.order
            .extend((0..self.entries.len() as Slot).filter(|&s| self.entries[s as usize].live));
        let entries = &self.entries;
        self.order
            .sort_unstable_by_key(|&s| entries[s as usize].name_at);
        let mut write = 0usize;
        for &s in &self.order {
            let e = &mut self.entries[s as usize];
            let (at, len) = (e.name_at as usize, e.name_len as usize);
            self.names.copy_within(at..at + len, write);
            e.name_at = write as u32;
            write += len;
        }
        self.names.truncate(write);
    }
}

/// Watch descriptor → slot: open addressing with linear probing over a
/// power-of-two table at least twice the slots, removal by backward shift
/// (no tombstones, so it never degrades or grows). The kernel hands out wds
/// in increasing order, and the wd itself is the hash, so the buckets in
/// use are few and close together: the pages of an unused table are never
/// touched (it is zero-filled by the allocator; 0 is never a wd).
struct WdMap {
    buckets: Vec<u64>,
    mask: usize,
}

impl WdMap {
    fn new(max: usize) -> WdMap {
        let size = (2 * max).next_power_of_two().max(16);
        WdMap {
            buckets: vec![0; size],
            mask: size - 1,
        }
    }

    fn key(b: u64) -> i32 {
        (b >> 32) as i32
    }

    fn home(&self, wd: i32) -> usize {
        wd as u32 as usize & self.mask
    }

    fn get(&self, wd: i32) -> Option<Slot> {
        let mut i = self.home(wd);
        loop {
            let b = self.buckets[i];
            if b == 0 {
                return None;
            }
            if Self::key(b) == wd {
                return Some(b as u32);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Inserts or updates; the caller keeps the count below half the size.
    fn insert(&mut self, wd: i32, slot: Slot) {
        debug_assert!(wd != 0);
        let entry = (u64::from(wd as u32) << 32) | u64::from(slot);
        let mut i = self.home(wd);
        loop {
            let b = self.buckets[i];
            if b == 0 || Self::key(b) == wd {
                self.buckets[i] = entry;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn remove(&mut self, wd: i32) {
        let mut i = self.home(wd);
        loop {
            let b = self.buckets[i];
            if b == 0 {
                return;
            }
            if Self::key(b) == wd {
                break;
            }
            i = (i + 1) & self.mask;
        }
        // Backward shift: pull later members of the run into the hole when
        // their home is not between the hole and them.
        let mut hole = i;
        let mut j = (i + 1) & self.mask;
        loop {
            let b = self.buckets[j];
            if b == 0 {
                break;
            }
            let home = self.home(Self::key(b));
            let distance_to_j = j.wrapping_sub(home) & self.mask;
            let distance_to_hole = hole.wrapping_sub(home) & self.mask;
            if distance_to_hole <= distance_to_j {
                self.buckets[hole] = b;
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        self.buckets[hole] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(t: &WatchTable, s: Slot) -> String {
        let mut buf = [0u8; 4096];
        let n = t.path(s, &mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn the_wd_map_agrees_with_a_reference_map_under_churn() {
        let mut m = WdMap::new(64);
        let mut reference = std::collections::HashMap::new();
        let mut seed = 7u64;
        for step in 0..20_000u32 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            // wds in a narrow range collide a lot in a 128-bucket table.
            let wd = 1 + (seed >> 40) as i32 % 500;
            if reference.len() < 64 && (seed >> 20) % 3 != 0 {
                m.insert(wd, step);
                reference.insert(wd, step);
            } else {
                m.remove(wd);
                reference.remove(&wd);
            }
            if step % 97 == 0 {
                for probe in 1..501 {
                    assert_eq!(
                        m.get(probe),
                        reference.get(&probe).copied(),
                        "wd {probe} at step {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn paths_follow_a_renamed_directory() {
        let mut t = WatchTable::new(16);
        let root = t.insert(1, NO_SLOT, b"/data").unwrap();
        let a = t.insert(2, root, b"a").unwrap();
        let b = t.insert(3, a, b"b").unwrap();
        assert_eq!(path(&t, b), "/data/a/b");
        t.rename(a, root, b"renamed").unwrap();
        assert_eq!(path(&t, b), "/data/renamed/b");
        assert_eq!(t.child(root, b"renamed"), Some(a));
        assert_eq!(t.slot_of(3), Some(b));
        let mut below = Vec::new();
        t.for_each_descendant(root, |s| below.push(s));
        below.sort();
        assert_eq!(below, vec![a, b]);
    }

    #[test]
    fn slots_are_reused_and_the_limit_holds() {
        let mut t = WatchTable::new(2);
        let root = t.insert(1, NO_SLOT, b"/r").unwrap();
        let a = t.insert(2, root, b"a").unwrap();
        assert_eq!(t.insert(3, root, b"b"), Err(Full::Slots));
        assert_eq!(t.remove(a), Some(2));
        assert_eq!(t.slot_of(2), None);
        let b = t.insert(3, root, b"b").unwrap();
        assert_eq!(b, a, "the freed slot is reused");
        assert_eq!(t.len(), 2);
        // The same wd again updates instead of taking a slot.
        assert_eq!(t.insert(3, root, b"c").unwrap(), b);
        assert_eq!(path(&t, b), "/r/c");
    }

    #[test]
    fn the_name_arena_compacts_instead_of_growing() {
        let mut t = WatchTable::new(4);
        let cap = t.names.capacity();
        let root = t.insert(1, NO_SLOT, b"/r").unwrap();
        let long = vec![b'x'; 200];
        // Far more name bytes over time than the arena holds at once.
        for i in 0..10_000 {
            let s = t.insert(100 + i, root, &long).unwrap();
            assert_eq!(t.name(s), &long[..]);
            t.remove(s);
        }
        assert_eq!(t.names.capacity(), cap, "no reallocation");
        assert_eq!(path(&t, root), "/r");
    }

    #[test]
    fn a_path_that_does_not_fit_is_refused() {
        let mut t = WatchTable::new(4);
        let root = t.insert(1, NO_SLOT, b"/data").unwrap();
        let a = t.insert(2, root, b"abc").unwrap();
        let mut small = [0u8; 8];
        assert_eq!(t.path(a, &mut small), None);
        let mut exact = [0u8; 9];
        assert_eq!(t.path(a, &mut exact), Some(9));
        assert_eq!(&exact, b"/data/abc");
    }
}
