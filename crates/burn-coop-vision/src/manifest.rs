//! The checksum manifest of the CIFAR-10 binary release (`datasets/cifar10/MANIFEST.md5`,
//! compiled into the crate so verification works from any directory).

/// The manifest text, in `md5sum -c` format.
pub const MANIFEST_MD5: &str = include_str!("../../../datasets/cifar10/MANIFEST.md5");

/// md5 of the official `cifar-10-binary.tar.gz`.
pub const OFFICIAL_TARBALL_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// File name → md5 pairs, parsed from `md5sum` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<(String, String)>,
}

impl Manifest {
    /// Parses `md5sum` lines (`<hex>  <name>` or `<hex> *<name>`); blank lines and `#` comments
    /// are ignored, as are malformed lines.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let (hash, name) = l.split_once(char::is_whitespace)?;
                let name = name.trim_start().trim_start_matches('*');
                let valid = hash.len() == 32 && hash.chars().all(|c| c.is_ascii_hexdigit());
                (valid && !name.is_empty()).then(|| (name.to_string(), hash.to_ascii_lowercase()))
            })
            .collect();
        Self { entries }
    }

    /// The manifest of the official release (the six batch files).
    pub fn official() -> Self {
        Self::parse(MANIFEST_MD5)
    }

    /// Expected md5 (lowercase hex) of a file, by its name (without folder).
    pub fn expected(&self, file_name: &str) -> Option<&str> {
        self.entries.iter().find(|(n, _)| n == file_name).map(|(_, h)| h.as_str())
    }

    /// All `(file name, md5)` entries in manifest order.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }
}
