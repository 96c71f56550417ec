//! Reading CIFAR-10 binary files: round trips, every corrupt-input error, and the real data.

mod common;

use std::path::PathBuf;

use burn::data::dataset::Dataset;
use burn_coop_vision::cifar::record::{encode_records, write_batch_file};
use burn_coop_vision::cifar::source::{extract_archive, read_archive_files};
use burn_coop_vision::{
    Cifar10, CifarError, CifarSource, CifarSplit, IMAGE_BYTES, LocateOptions, Manifest, RECORD_BYTES, Verify, locate,
    md5_hex, verify_bytes, verify_file,
};
use common::{pattern_data, real_archive, temp_dir, write_raw_tar_gz, write_tar_gz};

/// Writes a complete generated release (5 train files of 4 images, 1 test file of 3) into
/// `dir/cifar-10-batches-bin` and returns the expected (train, test) data.
fn write_generated_release(dir: &std::path::Path) -> (Cifar10, Cifar10) {
    let batches = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&batches).unwrap();
    let mut train_images = Vec::new();
    let mut train_labels = Vec::new();
    for (k, name) in CifarSplit::Train.files().iter().enumerate() {
        let (images, labels) = pattern_data(4, k as u8 * 17);
        write_batch_file(&batches.join(name), &images, &labels).unwrap();
        train_images.extend_from_slice(&images);
        train_labels.extend_from_slice(&labels);
    }
    let (test_images, test_labels) = pattern_data(3, 99);
    write_batch_file(&batches.join("test_batch.bin"), &test_images, &test_labels).unwrap();
    (Cifar10::from_raw(train_images, train_labels).unwrap(), Cifar10::from_raw(test_images, test_labels).unwrap())
}

#[test]
fn generated_folder_round_trips_exactly() {
    let dir = temp_dir();
    let (train, test) = write_generated_release(dir.path());
    let source = CifarSource::from_path(dir.path()).unwrap();
    assert_eq!(source, CifarSource::Folder(dir.path().join("cifar-10-batches-bin")));
    let loaded_train = Cifar10::load(&source, CifarSplit::Train, Verify::Skip).unwrap();
    let loaded_test = Cifar10::load(&source, CifarSplit::Test, Verify::Skip).unwrap();
    assert_eq!(loaded_train, train);
    assert_eq!(loaded_test, test);
    assert_eq!(loaded_train.len(), 20);
    assert_eq!(loaded_test.len(), 3);

    // Known pixels: image 5 is image 1 of data_batch_2 (salt 17).
    let img = loaded_train.image(5);
    let expected = |c: usize, y: usize, x: usize| (7 + c * 50 + y * 3 + x * 5) as u8 ^ 17;
    assert_eq!(img[0], expected(0, 0, 0));
    assert_eq!(img[1024 + 32 * 3 + 4], expected(1, 3, 4));
    assert_eq!(img[2048 + 32 * 31 + 31], expected(2, 31, 31));
    assert_eq!(loaded_train.label(5), 1);
    assert_eq!(loaded_test.labels(), &[0, 1, 2]);

    // Burn's Dataset view agrees.
    let item = Dataset::get(&loaded_train, 5).unwrap();
    assert_eq!(item.image, img.to_vec());
    assert_eq!(item.label, 1);
    assert_eq!(item.index, 5);
    assert!(Dataset::get(&loaded_train, 20).is_err());
    assert_eq!(Dataset::len(&loaded_train), 20);
}

#[test]
fn generated_archive_round_trips_and_extracts() {
    let dir = temp_dir();
    let (train, test) = write_generated_release(dir.path());
    let batches = dir.path().join("cifar-10-batches-bin");
    let files: Vec<(String, Vec<u8>)> = CifarSplit::Train
        .files()
        .iter()
        .chain(CifarSplit::Test.files())
        .map(|n| (format!("cifar-10-batches-bin/{n}"), std::fs::read(batches.join(n)).unwrap()))
        .collect();
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let archive = dir.path().join("generated.tar.gz");
    write_tar_gz(&archive, &entries);

    let source = CifarSource::from_path(&archive).unwrap();
    assert_eq!(source, CifarSource::Archive(archive.clone()));
    let (a_train, a_test) = Cifar10::load_splits(&source, Verify::Skip).unwrap();
    assert_eq!(a_train, train);
    assert_eq!(a_test, test);

    let out = dir.path().join("extracted");
    let folder = extract_archive(&archive, &out).unwrap();
    assert_eq!(folder, out.join("cifar-10-batches-bin"));
    let e_test = Cifar10::load(&CifarSource::Folder(folder), CifarSplit::Test, Verify::Skip);
    assert_eq!(e_test.unwrap(), test);
    // Nothing but the batches folder is left in the destination (the temp folder is gone).
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("cifar-10-batches-bin")]);
}

#[test]
fn encode_matches_the_record_layout() {
    let (images, labels) = pattern_data(2, 0);
    let bytes = encode_records(&images, &labels);
    assert_eq!(bytes.len(), 2 * RECORD_BYTES);
    assert_eq!(bytes[0], 0);
    assert_eq!(bytes[RECORD_BYTES], 1);
    assert_eq!(&bytes[1..RECORD_BYTES], &images[..IMAGE_BYTES]);
}

#[test]
fn missing_file_is_reported() {
    let dir = temp_dir();
    write_generated_release(dir.path());
    let batches = dir.path().join("cifar-10-batches-bin");
    std::fs::remove_file(batches.join("data_batch_3.bin")).unwrap();
    let err = Cifar10::load(&CifarSource::Folder(batches.clone()), CifarSplit::Train, Verify::Skip).unwrap_err();
    match err {
        CifarError::MissingFile { path } => assert_eq!(path, batches.join("data_batch_3.bin")),
        other => panic!("unexpected error {other:?}"),
    }
    let nowhere = dir.path().join("nowhere");
    assert!(matches!(
        CifarSource::from_path(&nowhere),
        Err(CifarError::MissingFile { path }) if path == nowhere
    ));
}

#[test]
fn bad_file_size_is_reported() {
    let dir = temp_dir();
    let (images, labels) = pattern_data(10, 0);
    let mut bytes = encode_records(&images, &labels);
    bytes.pop();
    let path = dir.path().join("data_batch_1.bin");
    std::fs::write(&path, &bytes).unwrap();
    let err = Cifar10::from_files(std::slice::from_ref(&path), Verify::Skip).unwrap_err();
    match &err {
        CifarError::BadFileSize { path: p, size } => {
            assert_eq!(p, &path);
            assert_eq!(*size, 10 * RECORD_BYTES as u64 - 1);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("not a multiple of the 3,073-byte"));
}

#[test]
fn bad_label_is_reported() {
    let dir = temp_dir();
    let (images, mut labels) = pattern_data(10, 0);
    labels[7] = 10;
    let path = dir.path().join("test_batch.bin");
    write_batch_file(&path, &images, &labels).unwrap();
    let err = Cifar10::from_files(std::slice::from_ref(&path), Verify::Skip).unwrap_err();
    match err {
        CifarError::BadLabel { path: p, record, label } => {
            assert_eq!(p, path);
            assert_eq!(record, 7);
            assert_eq!(label, 10);
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn checksum_mismatch_is_reported() {
    let dir = temp_dir();
    let (images, labels) = pattern_data(10, 0);
    let path = dir.path().join("data_batch_1.bin");
    write_batch_file(&path, &images, &labels).unwrap();
    let good = md5_hex(&std::fs::read(&path).unwrap());
    verify_file(&path, &good).unwrap();
    verify_file(&path, &good.to_uppercase()).unwrap();

    // Flip one pixel: the md5 no longer matches.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    match verify_file(&path, &good).unwrap_err() {
        CifarError::ChecksumMismatch { file, expected, actual } => {
            assert_eq!(file, path.display().to_string());
            assert_eq!(expected, good);
            assert_eq!(actual, md5_hex(&bytes));
        }
        other => panic!("unexpected error {other:?}"),
    }
    // Generated data named like an official file fails official verification.
    let official = Manifest::official().expected("data_batch_1.bin").unwrap().to_string();
    match Cifar10::from_files(std::slice::from_ref(&path), Verify::Official).unwrap_err() {
        CifarError::ChecksumMismatch { expected, .. } => assert_eq!(expected, official),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(verify_bytes("x", b"", "d41d8cd98f00b204e9800998ecf8427e").is_ok());
}

#[test]
fn manifest_lists_the_six_official_files() {
    let m = Manifest::official();
    assert_eq!(m.entries().len(), 6);
    assert_eq!(m.expected("data_batch_1.bin"), Some("5dd7e06a14cb22eb9f671a540d1b7c25"));
    assert_eq!(m.expected("test_batch.bin"), Some("803d5f7f4d78ea53de84dbe85f74fb6d"));
    assert_eq!(m.expected("batches.meta.txt"), None);
}

#[test]
fn truncated_archive_is_reported() {
    let dir = temp_dir();
    let (images, labels) = pattern_data(10, 0);
    let bytes = encode_records(&images, &labels);
    let archive = dir.path().join("full.tar.gz");
    write_tar_gz(&archive, &[("cifar-10-batches-bin/test_batch.bin", &bytes)]);
    let full = std::fs::read(&archive).unwrap();
    for keep in [full.len() / 2, full.len() - 4, 5] {
        let cut = dir.path().join(format!("cut-{keep}.tar.gz"));
        std::fs::write(&cut, &full[..keep]).unwrap();
        let err = Cifar10::load(&CifarSource::Archive(cut.clone()), CifarSplit::Test, Verify::Skip).unwrap_err();
        assert!(matches!(&err, CifarError::CorruptArchive { path, .. } if path == &cut), "keep {keep}: {err:?}");
        let err = extract_archive(&cut, &dir.path().join("out")).unwrap_err();
        assert!(matches!(err, CifarError::CorruptArchive { .. }), "{err:?}");
    }
    // Not gzip at all.
    let junk = dir.path().join("junk.tar.gz");
    std::fs::write(&junk, b"this is not a gzip stream at all").unwrap();
    let err = read_archive_files(&junk, &["test_batch.bin"]).unwrap_err();
    assert!(matches!(err, CifarError::CorruptArchive { .. }), "{err:?}");
    // A valid archive without the wanted file.
    let err = read_archive_files(&archive, &["data_batch_1.bin"]).unwrap_err();
    assert!(matches!(err, CifarError::MissingFile { .. }), "{err:?}");
}

#[test]
fn unsafe_archive_paths_are_rejected() {
    let dir = temp_dir();
    let cases: [(&str, tar::EntryType, &str); 5] = [
        ("../evil.bin", tar::EntryType::Regular, ""),
        ("cifar-10-batches-bin/../../evil.bin", tar::EntryType::Regular, ""),
        ("/tmp/evil.bin", tar::EntryType::Regular, ""),
        ("cifar-10-batches-bin/link", tar::EntryType::Symlink, "../../etc/passwd"),
        ("cifar-10-batches-bin/hard", tar::EntryType::Link, "/etc/passwd"),
    ];
    for (i, (name, kind, link)) in cases.iter().enumerate() {
        let archive = dir.path().join(format!("evil-{i}.tar.gz"));
        let data: &[u8] = if kind.is_file() { b"pwned" } else { b"" };
        write_raw_tar_gz(&archive, name, *kind, link, data);
        let dest = dir.path().join(format!("dest-{i}"));
        let err = extract_archive(&archive, &dest).unwrap_err();
        match &err {
            CifarError::UnsafeArchivePath { entry } => assert!(entry.contains(name), "{entry}"),
            other => panic!("{name}: unexpected error {other:?}"),
        }
        let err = read_archive_files(&archive, &["test_batch.bin"]).unwrap_err();
        assert!(matches!(err, CifarError::UnsafeArchivePath { .. }), "{err:?}");
    }
    assert!(!dir.path().join("evil.bin").exists());
    // A symlink that stays inside the archive is not an error (and is not created).
    let archive = dir.path().join("inner-link.tar.gz");
    write_raw_tar_gz(&archive, "cifar-10-batches-bin/l", tar::EntryType::Symlink, "x.bin", b"");
    let err = extract_archive(&archive, &dir.path().join("inner")).unwrap_err();
    assert!(matches!(err, CifarError::MissingFile { .. }), "{err:?}");
}

#[test]
fn locate_prefers_explicit_path_then_default_root() {
    let dir = temp_dir();
    write_generated_release(dir.path());
    let other = temp_dir();
    let opts = LocateOptions::new().with_env(false).with_download(false).with_default_root(other.path());
    // Nothing at the default root and no download: a clear error naming the default root.
    let err = locate(&opts).unwrap_err();
    assert!(matches!(err, CifarError::DownloadDisabled { .. }), "{err:?}");
    assert!(err.to_string().contains("BURN_COOP_CIFAR10"));
    // The explicit path wins.
    let found = locate(&opts.clone().with_path(dir.path())).unwrap();
    assert_eq!(found, CifarSource::Folder(dir.path().join("cifar-10-batches-bin")));
    // The default root is used when there is no explicit path.
    let found = locate(&opts.with_default_root(dir.path())).unwrap();
    assert_eq!(found, CifarSource::Folder(dir.path().join("cifar-10-batches-bin")));
}

#[test]
fn default_root_is_found_from_a_subfolder() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let found = burn_coop_vision::default_root_from(&root.join("src"));
    assert!(found.ends_with("datasets/cifar10"), "{}", found.display());
    assert!(found.join("MANIFEST.md5").is_file());
}

#[test]
fn real_archive_has_the_documented_contents() {
    let Some(archive) = real_archive() else {
        return;
    };
    let source = CifarSource::from_path(&archive).unwrap();
    let (train, test) = Cifar10::load_splits(&source, Verify::Official).unwrap();
    assert_eq!(train.len(), 50_000);
    assert_eq!(test.len(), 10_000);
    assert_eq!(train.class_counts(), [5_000; 10]);
    assert_eq!(test.class_counts(), [1_000; 10]);
    assert_eq!(train.label(0), 6, "first training image is a frog");
    assert_eq!(test.label(0), 3, "first test image is a cat");
    assert_eq!(burn_coop_vision::CLASS_NAMES[6], "frog");
    assert_eq!(burn_coop_vision::CLASS_NAMES[3], "cat");
    // The checksums of the six files verify against the manifest.
    let manifest = Manifest::official();
    let names: Vec<&str> = manifest.entries().iter().map(|(n, _)| n.as_str()).collect();
    let files = read_archive_files(&archive, &names).unwrap();
    for (name, md5) in manifest.entries() {
        assert_eq!(&md5_hex(&files[name]), md5, "{name}");
    }
}

#[test]
fn failed_download_explains_how_to_use_a_local_copy() {
    let dir = temp_dir();
    let dest = dir.path().join("cifar-10-binary.tar.gz");
    // Nothing listens on port 9 of the loopback interface: the connection is refused at once.
    let url = "http://127.0.0.1:9/cifar-10-binary.tar.gz";
    let err = burn_coop_vision::cifar::source::download(url, &dest, dir.path()).unwrap_err();
    let message = err.to_string();
    match &err {
        CifarError::Download { url: u, default, .. } => {
            assert_eq!(u, url);
            assert_eq!(default, dir.path());
        }
        CifarError::DownloadDisabled { .. } => {}
        other => panic!("unexpected error {other:?}"),
    }
    assert!(message.contains("BURN_COOP_CIFAR10"), "{message}");
    assert!(message.contains("--data PATH"), "{message}");
    assert!(message.contains(&dir.path().display().to_string()), "{message}");
    assert!(!dest.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no partial file is left");
}
