//! Reading the config directory: which files, in what order, and splitting
//! them into YAML documents.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

use super::error::Problem;

/// One config file's text, named relative to the loaded directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub rel: String,
    pub text: String,
}

/// Reads every `.yaml`/`.yml` file under `dir`, recursively, sorted by path.
///
/// Entries starting with `.` are skipped: a mounted ConfigMap keeps the real
/// files in `..data/`-style hidden directories next to symlinks to them, and
/// reading both would define every object twice. Symlinked files are
/// followed; symlinked directories are not, so a link loop cannot hang us.
pub(crate) fn read_sources(dir: &Path) -> Result<Vec<Source>, Vec<Problem>> {
    let (files, mut problems) = config_files(dir);
    let mut sources = Vec::with_capacity(files.len());
    for (path, _) in files {
        let rel = relative(dir, &path);
        match fs::read(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => sources.push(Source { rel, text }),
                Err(_) => problems.push(file_problem(&rel, "is not valid UTF-8")),
            },
            Err(e) => problems.push(file_problem(&rel, &format!("cannot read: {e}"))),
        }
    }
    if problems.is_empty() {
        Ok(sources)
    } else {
        Err(problems)
    }
}

/// The config files under `dir`, sorted by path, with what `stat` said of each (following
/// symlinks), and what could not be looked at. [`read_sources`] reads these and [`stamp`]
/// describes these, so the two cannot disagree on which files count. Inlined into both, whose
/// names `mesh-node/hot-symbols.txt` lists (the watcher calls `stamp` on every poll).
#[inline(always)]
fn config_files(dir: &Path) -> (Vec<(PathBuf, fs::Metadata)>, Vec<Problem>) {
    let (mut files, mut problems) = (Vec::new(), Vec::new());
    collect(dir, dir, &mut files, &mut problems);
    files.sort_by(|a, b| a.0.cmp(&b.0));
    (files, problems)
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(PathBuf, fs::Metadata)>, problems: &mut Vec<Problem>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            let name = if dir == root {
                dir.display().to_string()
            } else {
                relative(root, dir)
            };
            problems.push(file_problem(&name, &format!("cannot read directory: {e}")));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            collect(root, &path, files, problems);
        } else if is_yaml(&path)
            && let Ok(meta) = fs::metadata(&path)
            && meta.is_file()
        {
            files.push((path, meta));
        }
    }
}

fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn file_problem(file: &str, message: &str) -> Problem {
    Problem {
        file: file.to_string(),
        location: None,
        object: None,
        field: None,
        message: message.to_string(),
    }
}

/// A change detector for the watcher: FNV-1a over names and contents, so it
/// is the same for the same inputs in every run.
pub(crate) fn fingerprint(sources: &[Source]) -> u64 {
    let mut hash = Fnv::default();
    for s in sources {
        hash.write(s.rel.as_bytes());
        hash.write(&[0]);
        hash.write(s.text.as_bytes());
        hash.write(&[0]);
    }
    hash.0
}

/// What the watcher looks at on every poll before it reads a file: the names of the files
/// [`read_sources`] would read, each one's device, inode, size and modification and change
/// times, and the newest of those times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub hash: u64,
    pub newest: std::time::SystemTime,
}

/// The directory's [`Stamp`], or `None` when a directory or file could not be looked at
/// (the caller then reads, and reports what is wrong).
///
/// Any write to a file moves its change time, which tools cannot set back (unlike the
/// modification time), and a ConfigMap update swaps its files for new ones (new inodes),
/// so an unchanged stamp means unchanged files, with one exception the caller covers:
/// file times come from a clock that ticks every few milliseconds, and two writes of the
/// same size within one tick leave the same stamp.
pub(crate) fn stamp(dir: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let (files, problems) = config_files(dir);
    if !problems.is_empty() {
        return None;
    }
    let (mut hash, mut newest) = (Fnv::default(), std::time::UNIX_EPOCH);
    for (path, m) in files {
        newest = newest.max(m.modified().ok()?).max(std::time::UNIX_EPOCH + std::time::Duration::new(m.ctime().max(0) as u64, m.ctime_nsec() as u32));
        hash.write(relative(dir, &path).as_bytes());
        for n in [m.dev(), m.ino(), m.size(), m.mtime() as u64, m.mtime_nsec() as u64, m.ctime() as u64, m.ctime_nsec() as u64] {
            hash.write(&n.to_le_bytes());
        }
    }
    Some(Stamp { hash: hash.0, newest })
}

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The non-empty documents of one file with their 1-based position. A syntax
/// error is reported with its line and column and ends the file: the parser
/// cannot resynchronise after it.
pub(crate) fn documents(source: &Source, problems: &mut Vec<Problem>) -> Vec<(usize, Value)> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&source.text).enumerate() {
        match Value::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(mut value) => {
                // `<<: *anchor` merge keys are a YAML 1.1 feature people rely on.
                if let Err(e) = value.apply_merge() {
                    problems.push(yaml_problem(source, &e));
                    continue;
                }
                out.push((i + 1, value));
            }
            Err(e) => {
                problems.push(yaml_problem(source, &e));
                break;
            }
        }
    }
    out
}

fn yaml_problem(source: &Source, e: &serde_yaml::Error) -> Problem {
    let location = e.location().map(|l| (l.line(), l.column()));
    // serde_yaml repeats the position in its message; it is already in front.
    let message = e.to_string();
    let message = match message.split_once(" at line ") {
        Some((head, _)) if location.is_some() => head.to_string(),
        _ => message,
    };
    Problem {
        file: source.rel.clone(),
        location,
        object: None,
        field: None,
        message: format!("invalid YAML: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_recursively_sorted_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir_all(root.join("..data")).unwrap();
        fs::write(root.join("b.yaml"), "b").unwrap();
        fs::write(root.join("a.yml"), "a").unwrap();
        fs::write(root.join("sub/c.YAML"), "c").unwrap();
        fs::write(root.join("notes.txt"), "x").unwrap();
        fs::write(root.join("..data/d.yaml"), "d").unwrap();
        let sources = read_sources(root).unwrap();
        let names: Vec<&str> = sources.iter().map(|s| s.rel.as_str()).collect();
        assert_eq!(names, ["a.yml", "b.yaml", "sub/c.YAML"]);
        let before = fingerprint(&sources);
        fs::write(root.join("b.yaml"), "B").unwrap();
        assert_ne!(before, fingerprint(&read_sources(root).unwrap()));
    }

    #[test]
    fn the_stamp_follows_names_sizes_and_replaced_files_and_ignores_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a.yaml"), "a: 1").unwrap();
        fs::write(root.join("notes.txt"), "x").unwrap();
        let first = stamp(root).unwrap();
        assert_eq!(stamp(root), Some(first), "nothing changed");
        assert!(first.newest > std::time::SystemTime::now() - std::time::Duration::from_secs(60), "{first:?}");
        fs::write(root.join("notes.txt"), "not config").unwrap();
        assert_eq!(stamp(root).unwrap().hash, first.hash, "a file the config does not read");
        // A ConfigMap-style update: a new file renamed over the old one, same size.
        fs::write(root.join("new.tmp"), "a: 2").unwrap();
        fs::rename(root.join("new.tmp"), root.join("a.yaml")).unwrap();
        let replaced = stamp(root).unwrap();
        assert_ne!(replaced.hash, first.hash, "a new inode");
        fs::write(root.join("a.yaml"), "a: 22").unwrap();
        assert_ne!(stamp(root).unwrap().hash, replaced.hash, "a new size");
        fs::write(root.join("b.yml"), "").unwrap();
        let added = stamp(root).unwrap();
        fs::remove_file(root.join("b.yml")).unwrap();
        assert_ne!(stamp(root).unwrap().hash, added.hash, "a file gone");
        assert_eq!(stamp(Path::new("/nonexistent/mesh-config")), None);
    }

    #[test]
    fn missing_directory_is_a_problem() {
        let problems = read_sources(Path::new("/nonexistent/mesh-config")).unwrap_err();
        assert!(
            problems[0]
                .to_string()
                .starts_with("/nonexistent/mesh-config: cannot read directory"),
            "{:?}",
            problems
        );
    }

    #[test]
    fn splits_documents_and_reports_syntax_errors_with_line() {
        let src = Source {
            rel: "x.yaml".into(),
            text: "a: 1\n---\n---\nb: 2\n---\nc: [1,\nd: 3\n".into(),
        };
        let mut problems = Vec::new();
        let docs = documents(&src, &mut problems);
        assert_eq!(docs.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(problems.len(), 1);
        let line = problems[0].to_string();
        assert!(line.starts_with("x.yaml:8:1: invalid YAML: "), "{line}");
        assert!(line.contains("invalid YAML"), "{line}");
    }
}
