//! The document being imported, with the files its `$ref`s name: a multi-file document
//! (`$ref: schemas/pet.yaml`, `$ref: common.yaml#/components/schemas/Id`) is read as one.
//! Files are read when a reference is first followed, so a file only the parts toolgate does
//! not read name (responses, code samples) need not exist. A reference resolves against the
//! folder of the file it is written in, stays inside the root document's folder, and is never
//! fetched over the network.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{Map, Value};

/// `$ref`s followed inside one another at most this deep (a recursive schema, or files that
/// refer to each other, stop there).
pub const MAX_REF_DEPTH: usize = 16;

/// Other files read for one document at most.
const MAX_FILES: usize = 1_000;

/// What a file path written into a `$ref` must escape: `#` ends the path, `%` escapes.
const PATH_IN_REF: &AsciiSet = &CONTROLS.add(b'%').add(b'#');

pub struct Document {
    pub root: Value,
    /// The root document's folder (canonical): files outside it are not read.
    folder: PathBuf,
    /// Files read so far, by canonical path.
    files: RefCell<BTreeMap<PathBuf, Rc<Value>>>,
    /// Bytes (about) copied out of `$ref` targets so far: a small document whose references
    /// each name a large value would otherwise copy it past any memory.
    copied: std::cell::Cell<usize>,
}

/// The most `$ref` targets may copy, in all, for one import.
const MAX_COPIED_BYTES: usize = 256 << 20;

impl Document {
    pub fn read(path: &Path) -> Result<Document, String> {
        let root = read_file(path)?;
        let folder = path
            .canonicalize()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Document {
            root,
            folder,
            files: RefCell::default(),
            copied: Default::default(),
        })
    }

    /// A document of one file, held in memory (its file references are refused).
    #[cfg(test)]
    pub fn in_memory(root: Value) -> Document {
        Document {
            root,
            folder: PathBuf::from("/nonexistent-toolgate-test-folder"),
            files: RefCell::default(),
            copied: Default::default(),
        }
    }

    /// The value a `$ref` names. Taken from another file, its own references are rewritten to
    /// name their files by path, so they resolve wherever the value ends up.
    pub fn target(&self, reference: &str) -> Result<Value, String> {
        let target = self.target_uncounted(reference)?;
        let copied = self.copied.get().saturating_add(approximate_size(&target));
        if copied > MAX_COPIED_BYTES {
            return Err(format!(
                "$ref `{reference}`: the document's references copy more than {} MiB",
                MAX_COPIED_BYTES >> 20
            ));
        }
        self.copied.set(copied);
        Ok(target)
    }

    fn target_uncounted(&self, reference: &str) -> Result<Value, String> {
        let (file, fragment) = reference.rsplit_once('#').unwrap_or((reference, ""));
        let fragment = percent_decode_str(fragment)
            .decode_utf8()
            .map_err(|_| format!("$ref `{reference}`: not UTF-8"))?;
        if file.is_empty() {
            return self
                .root
                .pointer(&fragment)
                .cloned()
                .ok_or_else(|| format!("$ref `{reference}`: nothing there"));
        }
        let (path, text) = self.file(reference, file)?;
        let value = text.pointer(&fragment).ok_or_else(|| {
            format!(
                "$ref `{reference}`: nothing at `{fragment}` in {}",
                path.display()
            )
        })?;
        Ok(with_refs_from(value.clone(), &path))
    }

    /// The file a reference names (read once), and its canonical path.
    fn file(&self, reference: &str, file: &str) -> Result<(PathBuf, Rc<Value>), String> {
        if has_scheme(file) {
            return Err(format!(
                "$ref `{reference}`: toolgate does not fetch documents over the network: save it beside the document and refer to it by a relative path"
            ));
        }
        let decoded = percent_decode_str(file)
            .decode_utf8()
            .map_err(|_| format!("$ref `{reference}`: not UTF-8"))?;
        // Relative paths in the root document; files' own were made absolute when read.
        let path = self.folder.join(decoded.as_ref());
        let path = path
            .canonicalize()
            .map_err(|e| format!("$ref `{reference}`: {}: {e}", path.display()))?;
        if !path.starts_with(&self.folder) {
            return Err(format!(
                "$ref `{reference}`: {} is outside {}, the document's folder: not read",
                path.display(),
                self.folder.display()
            ));
        }
        // Only documents: a folder beside a spec is often a home or a repository, with keys
        // (`.ssh/id_rsa`, `gcp-key.json` names no schema) and devices or FIFOs in it.
        if let Err(why) = is_document(&path, &self.folder) {
            return Err(format!(
                "$ref `{reference}`: {}: {why}: not read",
                path.display()
            ));
        }
        if let Some(read) = self.files.borrow().get(&path) {
            return Ok((path, read.clone()));
        }
        if self.files.borrow().len() >= MAX_FILES {
            return Err(format!(
                "$ref `{reference}`: the document names more than {MAX_FILES} files"
            ));
        }
        let read = Rc::new(read_file(&path)?);
        self.files.borrow_mut().insert(path.clone(), read.clone());
        Ok((path, read))
    }
}

/// About how many bytes a value holds (its JSON text's length, give or take punctuation).
fn approximate_size(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len() + 2,
        Value::Array(items) => items.iter().map(approximate_size).sum::<usize>() + 2,
        Value::Object(map) => {
            map.iter()
                .map(|(k, v)| k.len() + 3 + approximate_size(v))
                .sum::<usize>()
                + 2
        }
        _ => 8,
    }
}

/// Whether `path` (canonical, inside `folder`) may be read as part of a document: a regular
/// `.yaml`, `.yml` or `.json` file, with no hidden file or folder on the way.
fn is_document(path: &Path, folder: &Path) -> Result<(), &'static str> {
    let inside = path.strip_prefix(folder).unwrap_or(path);
    if inside
        .components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    {
        return Err("a hidden file or folder");
    }
    let document = path.extension().is_some_and(|e| {
        ["yaml", "yml", "json"]
            .iter()
            .any(|d| e.eq_ignore_ascii_case(d))
    });
    if !document {
        return Err("not a .yaml, .yml or .json file");
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        _ => Err("not a regular file"),
    }
}

/// A document file, YAML or JSON, as JSON.
pub fn read_file(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let yaml: serde_norway::Value =
        serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(yaml_to_json(yaml))
}

/// `scheme:` before any `/` (`https:`, `file:`): a URL, not a path.
fn has_scheme(reference: &str) -> bool {
    reference.split_once(':').is_some_and(|(scheme, _)| {
        scheme.len() > 1
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

/// `value`, taken out of `file`, with its references naming `file` (`#/x`) or files beside
/// it (`x.yaml#/y`) by absolute path.
fn with_refs_from(value: Value, file: &Path) -> Value {
    let folder = file.parent().unwrap_or(Path::new("/"));
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| match (key.as_str(), value) {
                    ("$ref", Value::String(reference)) => {
                        let absolute = absolute_ref(&reference, file, folder);
                        (key, Value::String(absolute))
                    }
                    (_, value) => (key, with_refs_from(value, file)),
                })
                .collect::<Map<_, _>>(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| with_refs_from(v, file)).collect())
        }
        other => other,
    }
}

fn absolute_ref(reference: &str, file: &Path, folder: &Path) -> String {
    let (path, fragment) = reference.rsplit_once('#').unwrap_or((reference, ""));
    if has_scheme(path) {
        // Refused when followed.
        return reference.to_string();
    }
    let target = if path.is_empty() {
        file.to_path_buf()
    } else {
        let decoded = percent_decode_str(path).decode_utf8_lossy();
        lexically_normal(&folder.join(decoded.as_ref()))
    };
    let encoded = utf8_percent_encode(&target.to_string_lossy(), PATH_IN_REF).to_string();
    format!("{encoded}#{fragment}")
}

/// `a/b/../c` as `a/c` (the file need not exist yet: it is checked when read).
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

/// YAML as JSON (OpenAPI's YAML is JSON's data model; keys like `200` become strings).
pub fn yaml_to_json(value: serde_norway::Value) -> Value {
    use serde_norway::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(&n).unwrap_or(Value::Null),
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        other => serde_norway::to_string(&other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(tagged) => yaml_to_json(tagged.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder for one test, removed after.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let path =
                std::env::temp_dir().join(format!("toolgate-openapi-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(path.join("schemas")).unwrap();
            Scratch(path)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn file_references_resolve_against_their_own_file() {
        let dir = Scratch::new("refs");
        let root = dir.write("api.yaml", "openapi: 3.1.0\n");
        dir.write(
            "schemas/pet.yaml",
            "Pet:\n  properties:\n    id: {$ref: '#/Id'}\n    owner: {$ref: '../common.yaml#/Owner'}\nId: {type: integer}\n",
        );
        dir.write("common.yaml", "Owner: {type: string}\n");
        let doc = Document::read(&root).unwrap();
        let pet = doc.target("schemas/pet.yaml#/Pet").unwrap();
        // Both references now name their files, wherever the schema is used.
        let id = pet
            .pointer("/properties/id/$ref")
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(
            doc.target(id).unwrap(),
            serde_json::json!({"type": "integer"})
        );
        let owner = pet
            .pointer("/properties/owner/$ref")
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(
            doc.target(owner).unwrap(),
            serde_json::json!({"type": "string"})
        );
    }

    /// References that each copy a large value stop at a bound, before memory does.
    #[test]
    fn references_copy_a_bounded_amount() {
        let big = "x".repeat(1 << 20);
        let doc = Document::in_memory(serde_json::json!({"components": {"big": big}}));
        let copies = (0..400)
            .map(|_| doc.target("#/components/big"))
            .take_while(Result::is_ok)
            .count();
        assert!((200..300).contains(&copies), "{copies}");
        assert!(doc.target("#/components/big").unwrap_err().contains("MiB"));
    }

    #[test]
    fn urls_missing_files_and_files_outside_the_folder_are_refused() {
        let dir = Scratch::new("refused");
        let root = dir.write("schemas/api.yaml", "openapi: 3.1.0\n");
        dir.write("outside.yaml", "X: {type: string}\n");
        dir.write("schemas/.secret.yaml", "X: {type: string}\n");
        dir.write("schemas/key.pem", "-----BEGIN PRIVATE KEY-----\n");
        let doc = Document::read(&root).unwrap();
        for (reference, says) in [
            ("https://example.com/x.yaml#/X", "over the network"),
            ("file:///etc/passwd", "over the network"),
            ("../outside.yaml#/X", "outside"),
            ("/etc/hostname", "outside"),
            (".secret.yaml", "hidden"),
            ("key.pem", "not a .yaml"),
            ("nope.yaml#/X", "nope.yaml"),
            ("#/nope", "nothing there"),
        ] {
            let err = doc.target(reference).unwrap_err();
            assert!(err.contains(says), "{reference}: {err}");
        }
        assert!(!has_scheme("schemas/a:b.yaml"));
        assert!(has_scheme("http://x"));
    }
}
