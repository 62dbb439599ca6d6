//! A deterministic pseudo-random generator for randomized unit tests
//! (xorshift64): the same seed gives the same sequence on every run, so a
//! failure is reproducible.

/// xorshift64 state (never zero).
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// One of `items`, uniformly enough for tests.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}
