//! A document's bytes on their way from the download to the store: in memory while
//! small, in an anonymous temporary file once past a threshold, hashed (sha256) as they
//! arrive. Whatever the document's size, the process holds at most the threshold in
//! memory for it until a store asks for the bytes.
//!
//! This module depends on nothing else in the crate.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

/// Documents up to this size stay in memory.
pub const SPILL_AT: usize = 8 * 1024 * 1024;

/// The last bytes kept in memory whatever the size (a PDF's `%%EOF` marker is there).
const TAIL: usize = 1024;

pub struct Spool {
    memory: Vec<u8>,
    file: Option<File>,
    len: u64,
    hasher: Sha256,
    head: Vec<u8>,
    tail: Vec<u8>,
    spill_at: usize,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("len", &self.len)
            .field("on_disk", &self.file.is_some())
            .finish()
    }
}

impl Default for Spool {
    fn default() -> Self {
        Spool::new(SPILL_AT)
    }
}

impl Spool {
    /// A spool that keeps up to `spill_at` bytes in memory.
    pub fn new(spill_at: usize) -> Spool {
        Spool {
            memory: Vec::new(),
            file: None,
            len: 0,
            hasher: Sha256::new(),
            head: Vec::new(),
            tail: Vec::new(),
            spill_at,
        }
    }

    /// Appends bytes (the temporary file is created, unlinked, on first spill).
    pub fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        if self.head.len() < 64 {
            let take = (64 - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
        match &mut self.file {
            Some(file) => file.write_all(chunk),
            None if self.memory.len() + chunk.len() <= self.spill_at => {
                self.memory.extend_from_slice(chunk);
                Ok(())
            }
            None => {
                let mut file = tempfile::tempfile()?;
                file.write_all(&self.memory)?;
                file.write_all(chunk)?;
                self.memory = Vec::new();
                self.file = Some(file);
                Ok(())
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the bytes are in a temporary file rather than in memory.
    pub fn on_disk(&self) -> bool {
        self.file.is_some()
    }

    /// The first (up to 64) bytes.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The last (up to 1024) bytes.
    pub fn tail(&self) -> &[u8] {
        &self.tail
    }

    /// Lowercase hex sha256 of everything written.
    pub fn sha256(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// A reader over the bytes from the start (seekable: a ZIP is read from its end).
    pub fn reader(&mut self) -> std::io::Result<SpoolReader<'_>> {
        Ok(match &mut self.file {
            Some(file) => {
                file.seek(SeekFrom::Start(0))?;
                SpoolReader::File(file)
            }
            None => SpoolReader::Memory(std::io::Cursor::new(&self.memory)),
        })
    }

    /// All the bytes in memory (for a store that needs them whole).
    pub fn into_bytes(mut self) -> std::io::Result<Vec<u8>> {
        if self.file.is_none() {
            return Ok(self.memory);
        }
        let mut bytes = Vec::with_capacity(self.len as usize);
        self.reader()?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// Reads a spool's bytes.
pub enum SpoolReader<'a> {
    Memory(std::io::Cursor<&'a Vec<u8>>),
    File(&'a mut File),
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            SpoolReader::Memory(c) => c.read(buf),
            SpoolReader::File(f) => f.read(buf),
        }
    }
}

impl Seek for SpoolReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            SpoolReader::Memory(c) => c.seek(pos),
            SpoolReader::File(f) => f.seek(pos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_stays_in_memory_large_spills_and_both_read_back_exactly() {
        for size in [0usize, 10, 4096, 10_000] {
            let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut spool = Spool::new(5_000);
            for chunk in bytes.chunks(333) {
                spool.write(chunk).unwrap();
            }
            assert_eq!(spool.len(), size as u64);
            assert_eq!(spool.on_disk(), size > 5_000);
            assert_eq!(spool.sha256(), hex::encode(Sha256::digest(&bytes)));
            assert_eq!(spool.head(), &bytes[..size.min(64)]);
            assert_eq!(spool.tail(), &bytes[size.saturating_sub(1024)..]);
            let mut back = Vec::new();
            spool.reader().unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, bytes);
            assert_eq!(spool.into_bytes().unwrap(), bytes);
        }
    }
}
