//! The token cache: tokenize a jsonl file once, then read documents from disk.
//!
//! Per source file three data files and a meta file:
//!
//! * `{stem}-{key}.tok` — all token ids, little-endian u16 (vocab ≤ 65,536) or u32;
//! * `{stem}-{key}.cls` — one class byte per token (0 untrained, 1 trained, 2 tag);
//! * `{stem}-{key}.idx` — little-endian u64 end offset of each document;
//! * `{stem}-{key}.json` — what the cache was built from, sizes and CRC-32s; written last.
//!
//! `key` hashes the source's identity (canonical path, size, mtime), the tokenizer's hash, the
//! template version, the data kind and the format version, so a changed input never finds the
//! old cache. On open the meta is compared field by field and the data files are checked
//! against their recorded lengths and CRCs: a truncated or corrupt cache is rebuilt.
//!
//! Classes rather than weights are stored, so one cache serves every `think_weight`. Documents
//! are read with positional reads (not a memory map), so the resident set stays small however
//! large the cache is; the OS page cache does the caching.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{BadReason, DataError, Result};
use crate::jsonl::{for_each_record, Kind, Workers};
use crate::tokenizer::{ChatTokenizer, Encoded, TEMPLATE_VERSION};

/// Bumped when the on-disk layout changes.
pub const CACHE_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceId {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u128,
}

impl SourceId {
    pub fn of(path: &Path) -> Result<SourceId> {
        let canon = fs::canonicalize(path).map_err(|e| DataError::io(path, e))?;
        let md = fs::metadata(&canon).map_err(|e| DataError::io(path, e))?;
        let mtime = md.modified().map_err(|e| DataError::io(path, e))?;
        let mtime_ns = mtime
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(SourceId {
            path: canon,
            size: md.len(),
            mtime_ns,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheMeta {
    pub format: u32,
    pub source: SourceId,
    pub tokenizer_hash: String,
    pub template_version: u32,
    pub kind: String,
    pub docs: u64,
    pub tokens: u64,
    pub token_bytes: u8,
    pub crc_tok: u32,
    pub crc_cls: u32,
    pub crc_idx: u32,
    /// Bad lines skipped while building, by reason code.
    pub skipped: BTreeMap<String, u64>,
}

/// Delete the caches in `dir` of earlier versions of the same source file (same path, another
/// size or mtime), whatever their tokenizer or kind, once `stem` holds the current one: the
/// key includes the file's identity, so they can never be used again, and without this every
/// edit of a big file would leave its old cache behind. Caches of other files sharing the
/// directory are kept. Best effort: a cache that cannot be read or removed is left alone. The
/// meta goes first, so a reader racing with the removal sees an incomplete cache and rebuilds.
fn remove_stale_versions(dir: &Path, stem: &Path, src: &SourceId) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let current = with_ext(stem, "json");
    for entry in entries.flatten() {
        let path = entry.path();
        if path == current || path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(bytes) = fs::read(&path) else {
            continue;
        };
        let Ok(meta) = serde_json::from_slice::<CacheMeta>(&bytes) else {
            continue;
        };
        if meta.source.path == src.path && meta.source != *src && fs::remove_file(&path).is_ok() {
            let old_stem = path.with_extension("");
            for ext in ["tok", "cls", "idx"] {
                let _ = fs::remove_file(with_ext(&old_stem, ext));
            }
        }
    }
}

/// The tokenized documents of one source file.
pub struct DocStore {
    pub meta: CacheMeta,
    tok: File,
    cls: File,
    ends: Vec<u64>,
    path_stem: PathBuf,
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "text",
        Kind::Chat => "chat",
        Kind::Auto => "auto",
    }
}

fn cache_stem(dir: &Path, src: &SourceId, tok: &ChatTokenizer, kind: Kind) -> PathBuf {
    let mut h = Sha256::new();
    h.update(src.path.to_string_lossy().as_bytes());
    h.update(src.size.to_le_bytes());
    h.update(src.mtime_ns.to_le_bytes());
    h.update(tok.cache_identity().as_bytes());
    h.update(TEMPLATE_VERSION.to_le_bytes());
    h.update(kind_name(kind).as_bytes());
    h.update(CACHE_FORMAT.to_le_bytes());
    let key = format!("{:x}", h.finalize());
    let stem = src
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    dir.join(format!("{stem}-{}", &key[..16]))
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn crc_of_file(path: &Path, expected_len: u64) -> Option<u32> {
    let mut f = File::open(path).ok()?;
    if f.metadata().ok()?.len() != expected_len {
        return None;
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(hasher.finalize())
}

/// Parse and encode every record of `path` in order ([`for_each_record`], which applies the
/// empty-file rule), calling `f(line, encoded or why not)` for each non-blank line.
pub fn for_each_encoded(
    path: &Path,
    kind: Kind,
    tok: &ChatTokenizer,
    workers: Workers<'_>,
    f: impl FnMut(u64, std::result::Result<Encoded, BadReason>) -> Result<()>,
) -> Result<()> {
    for_each_record(
        path,
        kind,
        workers,
        |rec| {
            tok.encode_record(&rec)
                .map_err(|e| BadReason::BadSchema(e.to_string()))
        },
        f,
    )
}

impl DocStore {
    /// Open the cache of `path` in `dir`, building it if it is missing, stale or damaged.
    /// `skip_bad` = the bad-line policy; under "error" the first bad line is an error.
    pub fn open_or_build(
        path: &Path,
        kind: Kind,
        tok: &ChatTokenizer,
        dir: &Path,
        skip_bad: bool,
        workers: Workers<'_>,
    ) -> Result<DocStore> {
        fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let src = SourceId::of(path)?;
        let stem = cache_stem(dir, &src, tok, kind);
        if let Some(store) = Self::try_open(&stem, &src, tok, kind) {
            // A cache built under "skip" holds no record of the bad lines' text; under
            // "error" rebuild so that the error names the line.
            if skip_bad || store.meta.skipped.is_empty() {
                return Ok(store);
            }
        }
        Self::build(path, &src, &stem, kind, tok, skip_bad, workers)?;
        remove_stale_versions(dir, &stem, &src);
        Self::try_open(&stem, &src, tok, kind).ok_or_else(|| {
            DataError::Config(format!(
                "token cache {} failed its check right after being written",
                stem.display()
            ))
        })
    }

    fn try_open(stem: &Path, src: &SourceId, tok: &ChatTokenizer, kind: Kind) -> Option<DocStore> {
        let meta: CacheMeta =
            serde_json::from_slice(&fs::read(with_ext(stem, "json")).ok()?).ok()?;
        let fresh = meta.format == CACHE_FORMAT
            && &meta.source == src
            && meta.tokenizer_hash == tok.cache_identity().as_str()
            && meta.template_version == TEMPLATE_VERSION
            && meta.kind == kind_name(kind);
        if !fresh {
            return None;
        }
        let tok_len = meta.tokens * meta.token_bytes as u64;
        if crc_of_file(&with_ext(stem, "tok"), tok_len)? != meta.crc_tok
            || crc_of_file(&with_ext(stem, "cls"), meta.tokens)? != meta.crc_cls
            || crc_of_file(&with_ext(stem, "idx"), meta.docs * 8)? != meta.crc_idx
        {
            return None;
        }
        let idx = fs::read(with_ext(stem, "idx")).ok()?;
        let ends: Vec<u64> = idx
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
            .collect();
        if ends.last().copied().unwrap_or(0) != meta.tokens {
            return None;
        }
        Some(DocStore {
            tok: File::open(with_ext(stem, "tok")).ok()?,
            cls: File::open(with_ext(stem, "cls")).ok()?,
            ends,
            meta,
            path_stem: stem.to_owned(),
        })
    }

    fn build(
        path: &Path,
        src: &SourceId,
        stem: &Path,
        kind: Kind,
        tok: &ChatTokenizer,
        skip_bad: bool,
        workers: Workers<'_>,
    ) -> Result<()> {
        let token_bytes: u8 = if tok.vocab_size() <= 1 << 16 { 2 } else { 4 };
        let tmp = |ext: &str| with_ext(stem, &format!("{ext}.tmp{}", std::process::id()));
        let create = |p: &Path| -> Result<BufWriter<File>> {
            Ok(BufWriter::with_capacity(
                1 << 20,
                File::create(p).map_err(|e| DataError::io(p, e))?,
            ))
        };
        let (tok_tmp, cls_tmp, idx_tmp) = (tmp("tok"), tmp("cls"), tmp("idx"));
        let result = (|| -> Result<CacheMeta> {
            let mut w_tok = create(&tok_tmp)?;
            let mut w_cls = create(&cls_tmp)?;
            let mut w_idx = create(&idx_tmp)?;
            let (mut c_tok, mut c_cls, mut c_idx) = (
                crc32fast::Hasher::new(),
                crc32fast::Hasher::new(),
                crc32fast::Hasher::new(),
            );
            let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
            let (mut docs, mut tokens) = (0u64, 0u64);
            let mut bytes = Vec::new();
            for_each_encoded(path, kind, tok, workers, |line, item| {
                match item {
                    Ok(enc) => {
                        bytes.clear();
                        for &id in &enc.ids {
                            if token_bytes == 2 {
                                bytes.extend_from_slice(&(id as u16).to_le_bytes());
                            } else {
                                bytes.extend_from_slice(&id.to_le_bytes());
                            }
                        }
                        let io = |e| DataError::io(stem, e);
                        w_tok.write_all(&bytes).map_err(io)?;
                        c_tok.update(&bytes);
                        w_cls.write_all(&enc.classes).map_err(io)?;
                        c_cls.update(&enc.classes);
                        tokens += enc.ids.len() as u64;
                        docs += 1;
                        let end = tokens.to_le_bytes();
                        w_idx.write_all(&end).map_err(io)?;
                        c_idx.update(&end);
                    }
                    Err(reason) => {
                        if !skip_bad {
                            return Err(DataError::BadLine {
                                path: path.to_owned(),
                                line,
                                reason,
                            });
                        }
                        *skipped.entry(reason.code().to_owned()).or_default() += 1;
                    }
                }
                Ok(())
            })?;
            for (w, p) in [(w_tok, &tok_tmp), (w_cls, &cls_tmp), (w_idx, &idx_tmp)] {
                w.into_inner()
                    .map_err(|e| DataError::io(p, e.into_error()))?
                    .sync_all()
                    .map_err(|e| DataError::io(p, e))?;
            }
            Ok(CacheMeta {
                format: CACHE_FORMAT,
                source: src.clone(),
                tokenizer_hash: tok.cache_identity(),
                template_version: TEMPLATE_VERSION,
                kind: kind_name(kind).to_owned(),
                docs,
                tokens,
                token_bytes,
                crc_tok: c_tok.finalize(),
                crc_cls: c_cls.finalize(),
                crc_idx: c_idx.finalize(),
                skipped,
            })
        })();
        let meta = match result {
            Ok(m) => m,
            Err(e) => {
                for p in [&tok_tmp, &cls_tmp, &idx_tmp] {
                    let _ = fs::remove_file(p);
                }
                return Err(e);
            }
        };
        // Data files first, the meta last: a meta on disk means a complete cache.
        let _ = fs::remove_file(with_ext(stem, "json"));
        for (t, ext) in [(&tok_tmp, "tok"), (&cls_tmp, "cls"), (&idx_tmp, "idx")] {
            let dst = with_ext(stem, ext);
            fs::rename(t, &dst).map_err(|e| DataError::io(&dst, e))?;
        }
        let meta_tmp = tmp("json");
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| DataError::Config(e.to_string()))?;
        fs::write(&meta_tmp, json).map_err(|e| DataError::io(&meta_tmp, e))?;
        let dst = with_ext(stem, "json");
        fs::rename(&meta_tmp, &dst).map_err(|e| DataError::io(&dst, e))?;
        Ok(())
    }

    pub fn num_docs(&self) -> usize {
        self.ends.len()
    }

    pub fn doc_len(&self, i: usize) -> u64 {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.ends[i] - start
    }

    /// Append tokens `[from, from + len)` of document `i` to `ids` / `classes`.
    pub fn read(
        &self,
        i: usize,
        from: u64,
        len: u64,
        ids: &mut Vec<u32>,
        classes: &mut Vec<u8>,
    ) -> Result<()> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] } + from;
        let w = self.meta.token_bytes as u64;
        let mut buf = vec![0u8; (len * w) as usize];
        let io = |e| DataError::io(with_ext(&self.path_stem, "tok"), e);
        self.tok.read_exact_at(&mut buf, start * w).map_err(io)?;
        if w == 2 {
            ids.extend(
                buf.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            );
        } else {
            ids.extend(
                buf.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        let old = classes.len();
        classes.resize(old + len as usize, 0);
        self.cls
            .read_exact_at(&mut classes[old..], start)
            .map_err(|e| DataError::io(with_ext(&self.path_stem, "cls"), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonl::JsonlReader;
    use crate::test_support::{text_lines, tiny_tokenizer, write_lines};
    use std::sync::atomic::AtomicBool;

    /// Every document of `store` as (ids, classes).
    fn contents(store: &DocStore) -> Vec<Encoded> {
        (0..store.num_docs())
            .map(|i| {
                let mut e = Encoded::default();
                store
                    .read(i, 0, store.doc_len(i), &mut e.ids, &mut e.classes)
                    .unwrap();
                e
            })
            .collect()
    }

    /// What the cache must hold: the file's records, encoded one by one.
    fn encoded(path: &Path, tok: &ChatTokenizer) -> Vec<Encoded> {
        JsonlReader::open(path, Kind::Text)
            .unwrap()
            .map(|r| tok.encode_record(&r.unwrap().1.unwrap()).unwrap())
            .collect()
    }

    struct Setup {
        _dir: tempfile::TempDir,
        tok: ChatTokenizer,
        src: PathBuf,
        cache: PathBuf,
        pool: rayon::ThreadPool,
        cancel: AtomicBool,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let (tok, _) = tiny_tokenizer(&dir.path().join("tok"), true);
            let src = write_lines(&dir.path().join("pre.jsonl"), &text_lines(40, 0));
            Setup {
                tok,
                src,
                cache: dir.path().join("cache"),
                pool: rayon::ThreadPoolBuilder::new()
                    .num_threads(2)
                    .build()
                    .unwrap(),
                cancel: AtomicBool::new(false),
                _dir: dir,
            }
        }

        fn open(&self) -> DocStore {
            let workers = Workers {
                pool: &self.pool,
                cancel: &self.cancel,
            };
            DocStore::open_or_build(
                &self.src,
                Kind::Text,
                &self.tok,
                &self.cache,
                false,
                workers,
            )
            .unwrap()
        }

        fn stem(&self) -> PathBuf {
            cache_stem(
                &self.cache,
                &SourceId::of(&self.src).unwrap(),
                &self.tok,
                Kind::Text,
            )
        }

        /// The (size, modification time) of each cache file: a rebuild rewrites them.
        fn files(&self) -> BTreeMap<PathBuf, std::time::SystemTime> {
            fs::read_dir(&self.cache)
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    let t = fs::metadata(&p).unwrap().modified().unwrap();
                    (p, t)
                })
                .collect()
        }
    }

    /// The cache files get an old timestamp, so that a rebuild is seen in their mtimes.
    fn age(files: &BTreeMap<PathBuf, std::time::SystemTime>) {
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        for p in files.keys() {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
    }

    #[test]
    fn a_warm_open_reuses_the_cache_and_reads_what_was_encoded() {
        let s = Setup::new();
        let first = s.open();
        assert_eq!(contents(&first), encoded(&s.src, &s.tok));
        assert_eq!(first.meta.docs, 40);
        let before = s.files();
        assert_eq!(before.len(), 4);
        age(&before);
        let aged = s.files();
        let again = s.open();
        assert_eq!(s.files(), aged, "a valid cache is not rewritten");
        assert_eq!(contents(&again), encoded(&s.src, &s.tok));
    }

    #[test]
    fn a_changed_source_gets_a_new_key_and_the_old_version_is_removed() {
        let s = Setup::new();
        s.open();
        let old_stem = s.stem();
        // Same path, other contents (size and mtime change): the key changes.
        let mut lines = text_lines(40, 0);
        lines[3] = serde_json::json!({"text": "a changed line"}).to_string();
        lines.push(serde_json::json!({"text": "and one more"}).to_string());
        write_lines(&s.src, &lines);
        File::options()
            .write(true)
            .open(&s.src)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert_ne!(s.stem(), old_stem);
        let store = s.open();
        assert_eq!(store.meta.docs, 41);
        assert_eq!(contents(&store), encoded(&s.src, &s.tok));
        for ext in ["json", "tok", "cls", "idx"] {
            assert!(
                !with_ext(&old_stem, ext).exists(),
                "stale .{ext} left behind"
            );
        }
        assert_eq!(s.files().len(), 4);
    }

    #[test]
    fn a_torn_or_garbage_meta_is_rebuilt() {
        let s = Setup::new();
        let good = contents(&s.open());
        let meta = with_ext(&s.stem(), "json");
        let full = fs::read(&meta).unwrap();
        for damage in [
            full[..full.len() / 2].to_vec(),
            b"\x00\xffnot json at all".to_vec(),
            Vec::new(),
            b"{}".to_vec(),
        ] {
            fs::write(&meta, &damage).unwrap();
            assert!(DocStore::try_open(
                &s.stem(),
                &SourceId::of(&s.src).unwrap(),
                &s.tok,
                Kind::Text
            )
            .is_none());
            let before = s.files();
            age(&before);
            let store = s.open();
            assert_eq!(contents(&store), good);
            assert_eq!(fs::read(&meta).unwrap(), full, "the meta is written again");
            let after = s.files();
            let aged =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
            assert!(after.values().all(|&t| t > aged), "every file was rebuilt");
        }
    }

    #[test]
    fn a_flipped_byte_fails_the_crc_and_is_rebuilt() {
        let s = Setup::new();
        let good = contents(&s.open());
        for ext in ["tok", "cls", "idx"] {
            let p = with_ext(&s.stem(), ext);
            let mut bytes = fs::read(&p).unwrap();
            let original = bytes.clone();
            let at = bytes.len() / 3;
            bytes[at] ^= 0x01; // same length: only the CRC can tell
            fs::write(&p, &bytes).unwrap();
            let src = SourceId::of(&s.src).unwrap();
            assert!(DocStore::try_open(&s.stem(), &src, &s.tok, Kind::Text).is_none());
            let store = s.open();
            assert_eq!(contents(&store), good, "after a flipped byte in .{ext}");
            assert_eq!(fs::read(&p).unwrap(), original);
        }
    }
}
