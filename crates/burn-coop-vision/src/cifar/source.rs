//! Locating CIFAR-10 on disk, reading it straight from the archive, safe extraction and download.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::{CifarError, Result};
use crate::manifest::OFFICIAL_TARBALL_MD5;

/// Official download URL of the binary release.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// Environment variable naming a local copy (archive or folder).
pub const CIFAR10_ENV: &str = "BURN_COOP_CIFAR10";
/// File name of the archive.
pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
/// Folder name inside the archive.
pub const BATCHES_DIR: &str = "cifar-10-batches-bin";
/// Default data folder, relative to the workspace root.
pub const DEFAULT_DIR: &str = "datasets/cifar10";

/// Where the CIFAR-10 batch files are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CifarSource {
    /// A folder holding `data_batch_1.bin` … `test_batch.bin` (normally `cifar-10-batches-bin/`).
    Folder(PathBuf),
    /// A `.tar.gz` archive holding `cifar-10-batches-bin/`; read without extracting.
    Archive(PathBuf),
}

impl CifarSource {
    /// Interprets a user-given path: an archive file, the batches folder itself, or a folder
    /// containing `cifar-10-batches-bin/` or `cifar-10-binary.tar.gz` (the extracted folder wins).
    ///
    /// # Errors
    /// [`CifarError::MissingFile`] when none of these forms is found at `path`.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Ok(Self::Archive(path.to_path_buf()));
        }
        if path.is_dir() {
            if path.join("data_batch_1.bin").is_file() || path.join("test_batch.bin").is_file() {
                return Ok(Self::Folder(path.to_path_buf()));
            }
            let batches = path.join(BATCHES_DIR);
            if batches.is_dir() {
                return Ok(Self::Folder(batches));
            }
            let archive = path.join(ARCHIVE_NAME);
            if archive.is_file() {
                return Ok(Self::Archive(archive));
            }
            return Err(CifarError::MissingFile { path: batches });
        }
        Err(CifarError::MissingFile { path: path.to_path_buf() })
    }

    /// The path of the folder or archive.
    pub fn path(&self) -> &Path {
        match self {
            Self::Folder(p) | Self::Archive(p) => p,
        }
    }
}

/// How [`locate`] searches for the data.
#[derive(Debug, Clone)]
pub struct LocateOptions {
    /// Explicit path (archive, batches folder, or a folder containing either); highest priority.
    pub path: Option<PathBuf>,
    /// Consult the [`CIFAR10_ENV`] environment variable when `path` is `None`.
    pub use_env: bool,
    /// Default data folder (normally `<workspace>/datasets/cifar10`), searched next and used as
    /// the download destination.
    pub default_root: PathBuf,
    /// Download from [`CIFAR10_URL`] when nothing is found.
    pub download: bool,
}

impl LocateOptions {
    /// Options with the environment variable and downloading enabled, no explicit path, and the
    /// default root found by [`find_default_root`].
    pub fn new() -> Self {
        Self { path: None, use_env: true, default_root: find_default_root(), download: true }
    }

    /// Sets the explicit path.
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Sets the default root folder.
    pub fn with_default_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.default_root = root.into();
        self
    }

    /// Enables or disables the environment variable lookup.
    pub fn with_env(mut self, use_env: bool) -> Self {
        self.use_env = use_env;
        self
    }

    /// Enables or disables downloading.
    pub fn with_download(mut self, download: bool) -> Self {
        self.download = download;
        self
    }
}

impl Default for LocateOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Finds the default data folder: the first `datasets/cifar10` folder in the current directory or
/// one of its ancestors, else `./datasets/cifar10`.
pub fn find_default_root() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    default_root_from(&cwd)
}

/// Like [`find_default_root`], starting the search at `start`.
pub fn default_root_from(start: &Path) -> PathBuf {
    start
        .ancestors()
        .map(|dir| dir.join(DEFAULT_DIR))
        .find(|candidate| candidate.is_dir())
        .unwrap_or_else(|| start.join(DEFAULT_DIR))
}

/// Finds the data, in this order: `opts.path`; the [`CIFAR10_ENV`] variable; `opts.default_root`
/// (extracted folder, then archive); a download into `opts.default_root`.
///
/// # Errors
/// [`CifarError::MissingFile`] when an explicit path or the variable points at nothing usable;
/// [`CifarError::Download`] / [`CifarError::DownloadDisabled`] when nothing is found and the
/// download fails or is off; extraction errors of the downloaded archive.
pub fn locate(opts: &LocateOptions) -> Result<CifarSource> {
    if let Some(path) = &opts.path {
        return CifarSource::from_path(path);
    }
    if opts.use_env
        && let Some(value) = std::env::var_os(CIFAR10_ENV).filter(|v| !v.is_empty())
    {
        return CifarSource::from_path(Path::new(&value));
    }
    if let Ok(source) = CifarSource::from_path(&opts.default_root) {
        return Ok(source);
    }
    if !opts.download {
        return Err(CifarError::DownloadDisabled { default: opts.default_root.clone(), env: CIFAR10_ENV });
    }
    let archive = opts.default_root.join(ARCHIVE_NAME);
    download(CIFAR10_URL, &archive, &opts.default_root)?;
    let folder = extract_archive(&archive, &opts.default_root)?;
    Ok(CifarSource::Folder(folder))
}

/// Reads the wanted files (matched by file name, anywhere in the archive) from a `.tar.gz` into
/// memory, without extracting. Every entry path is checked as in [`extract_archive`].
///
/// # Errors
/// [`CifarError::CorruptArchive`] for a truncated or undecodable archive,
/// [`CifarError::UnsafeArchivePath`], and [`CifarError::MissingFile`] (path
/// `<archive>/cifar-10-batches-bin/<name>`) for a wanted file that is absent.
pub fn read_archive_files(archive: &Path, wanted: &[&str]) -> Result<HashMap<String, Vec<u8>>> {
    let file = std::fs::File::open(archive).map_err(|e| CifarError::io(archive, e))?;
    let corrupt = |e: std::io::Error| CifarError::CorruptArchive { path: archive.to_path_buf(), cause: e.to_string() };
    let mut tar = tar::Archive::new(GzDecoder::new(std::io::BufReader::new(file)));
    let mut found = HashMap::new();
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = check_entry(&entry)?;
        if kind != EntryKind::File {
            continue;
        }
        let path = entry.path().map_err(corrupt)?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if wanted.contains(&name) && !found.contains_key(name) {
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut bytes).map_err(corrupt)?;
            found.insert(name.to_string(), bytes);
        }
    }
    drain_to_end(tar.into_inner()).map_err(corrupt)?;
    for name in wanted {
        if !found.contains_key(*name) {
            return Err(CifarError::MissingFile { path: archive.join(BATCHES_DIR).join(name) });
        }
    }
    Ok(found)
}

/// Reads the rest of the gzip stream so that a truncated or corrupt tail is detected.
fn drain_to_end<R: Read>(mut reader: R) -> std::io::Result<()> {
    let mut buf = [0u8; 64 * 1024];
    while reader.read(&mut buf)? > 0 {}
    Ok(())
}

/// Safely extracts a `.tar.gz` into `dest_root`: entries are written into a temporary folder
/// inside `dest_root` which is then renamed into place, and `dest_root/cifar-10-batches-bin` is
/// returned. Only regular files and folders are written; links are never created.
///
/// # Errors
/// [`CifarError::UnsafeArchivePath`] (before anything is moved into place) for an absolute path,
/// a `..` component or a link whose target leaves the archive root;
/// [`CifarError::CorruptArchive`]; [`CifarError::MissingFile`] when the archive has no
/// `cifar-10-batches-bin/`; [`CifarError::Io`].
pub fn extract_archive(archive: &Path, dest_root: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dest_root).map_err(|e| CifarError::io(dest_root, e))?;
    let tmp = dest_root.join(format!(".extract-{}-{}", std::process::id(), unique_suffix()));
    let result = extract_into(archive, &tmp).and_then(|()| {
        let from = tmp.join(BATCHES_DIR);
        if !from.is_dir() {
            return Err(CifarError::MissingFile { path: archive.join(BATCHES_DIR) });
        }
        let to = dest_root.join(BATCHES_DIR);
        if to.exists() {
            std::fs::remove_dir_all(&to).map_err(|e| CifarError::io(&to, e))?;
        }
        std::fs::rename(&from, &to).map_err(|e| CifarError::io(&to, e))?;
        Ok(to)
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn extract_into(archive: &Path, tmp: &Path) -> Result<()> {
    let file = std::fs::File::open(archive).map_err(|e| CifarError::io(archive, e))?;
    let corrupt = |e: std::io::Error| CifarError::CorruptArchive { path: archive.to_path_buf(), cause: e.to_string() };
    std::fs::create_dir_all(tmp).map_err(|e| CifarError::io(tmp, e))?;
    let mut tar = tar::Archive::new(GzDecoder::new(std::io::BufReader::new(file)));
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = check_entry(&entry)?;
        let raw = entry.path().map_err(corrupt)?.into_owned();
        let rel = normalize(&raw).ok_or_else(|| unsafe_path(&raw, None))?;
        let target = tmp.join(&rel);
        match kind {
            EntryKind::Dir => {
                std::fs::create_dir_all(&target).map_err(|e| CifarError::io(&target, e))?;
            }
            EntryKind::File => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| CifarError::io(parent, e))?;
                }
                let mut out = std::fs::File::create(&target).map_err(|e| CifarError::io(&target, e))?;
                std::io::copy(&mut entry, &mut out).map_err(corrupt)?;
            }
            EntryKind::Skip => {}
        }
    }
    drain_to_end(tar.into_inner()).map_err(corrupt)?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    File,
    Dir,
    Skip,
}

/// Validates one entry's path (and link target) and classifies it.
fn check_entry<R: Read>(entry: &tar::Entry<'_, R>) -> Result<EntryKind> {
    let raw_bytes = entry.path_bytes();
    let raw = PathBuf::from(String::from_utf8_lossy(&raw_bytes).into_owned());
    let Some(rel) = normalize(&raw) else {
        return Err(unsafe_path(&raw, None));
    };
    let kind = entry.header().entry_type();
    if kind.is_symlink() || kind.is_hard_link() {
        let link = entry
            .link_name_bytes()
            .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()))
            .unwrap_or_default();
        // Symlinks resolve relative to the entry's folder, hard links relative to the root.
        let base =
            if kind.is_symlink() { rel.parent().map(Path::to_path_buf).unwrap_or_default() } else { PathBuf::new() };
        if normalize(&base.join(&link)).is_none() || link.is_absolute() {
            return Err(unsafe_path(&raw, Some(&link)));
        }
        return Ok(EntryKind::Skip);
    }
    Ok(if kind.is_dir() {
        EntryKind::Dir
    } else if kind.is_file() || kind == tar::EntryType::Continuous {
        EntryKind::File
    } else {
        EntryKind::Skip
    })
}

/// Lexically normalizes a relative path; `None` if it is absolute or climbs above its root.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn unsafe_path(entry: &Path, link: Option<&Path>) -> CifarError {
    let entry = match link {
        Some(link) => format!("{} -> {}", entry.display(), link.display()),
        None => entry.display().to_string(),
    };
    CifarError::UnsafeArchivePath { entry }
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Downloads `url` to `dest` (through a temporary file renamed into place), with a progress bar
/// when stderr is a terminal. A download from [`CIFAR10_URL`] is checked against
/// [`OFFICIAL_TARBALL_MD5`]. Connecting times out after 15 s and each read after 60 s, so a
/// machine without internet fails fast.
///
/// # Errors
/// [`CifarError::Download`] (its message explains how to use a local copy instead; `default_root`
/// is named there), [`CifarError::ChecksumMismatch`], [`CifarError::Io`];
/// [`CifarError::DownloadDisabled`] when built without the `download` feature.
pub fn download(url: &str, dest: &Path, default_root: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CifarError::io(parent, e))?;
    }
    let part = dest.with_extension(format!("part-{}", std::process::id()));
    let result = fetch_to(url, &part, default_root).and_then(|md5| {
        if url == CIFAR10_URL && md5 != OFFICIAL_TARBALL_MD5 {
            return Err(CifarError::ChecksumMismatch {
                file: url.to_string(),
                expected: OFFICIAL_TARBALL_MD5.to_string(),
                actual: md5,
            });
        }
        std::fs::rename(&part, dest).map_err(|e| CifarError::io(dest, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

#[cfg(feature = "download")]
fn fetch_to(url: &str, part: &Path, default_root: &Path) -> Result<String> {
    use md5::{Digest, Md5};
    use std::io::{IsTerminal, Write};
    use std::time::Duration;

    let fail = |cause: String| CifarError::Download {
        url: url.to_string(),
        cause,
        default: default_root.to_path_buf(),
        env: CIFAR10_ENV,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(15)))
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let body = response.into_body();
    let len = body.content_length();
    let mut reader = body.into_reader();
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(len.unwrap_or(0));
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("CIFAR-10");
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut out = std::fs::File::create(part).map_err(|e| CifarError::io(part, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| CifarError::io(part, e))?;
        bar.inc(n as u64);
    }
    out.flush().map_err(|e| CifarError::io(part, e))?;
    bar.finish_and_clear();
    Ok(crate::cifar::checksum::md5_hex_of(hasher.finalize().as_slice()))
}

#[cfg(not(feature = "download"))]
fn fetch_to(_url: &str, _part: &Path, default_root: &Path) -> Result<String> {
    Err(CifarError::DownloadDisabled { default: default_root.to_path_buf(), env: CIFAR10_ENV })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_rejects_escapes() {
        assert_eq!(normalize(Path::new("a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(normalize(Path::new("a/../b")), Some(PathBuf::from("b")));
        assert_eq!(normalize(Path::new("../b")), None);
        assert_eq!(normalize(Path::new("a/../../b")), None);
        assert_eq!(normalize(Path::new("/etc/passwd")), None);
    }
}
