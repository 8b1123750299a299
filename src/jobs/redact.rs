//! Job errors reach users: the service's own paths (its data directory, where uploads and
//! checkpoints live) are taken out of them, leaving the names inside it.

use std::path::Path;

/// `message` with every occurrence of `data_dir` (as configured and as an absolute path)
/// and the separator after it removed.
pub(super) fn without_server_paths(message: &str, data_dir: &Path) -> String {
    let mut forms: Vec<String> = vec![data_dir.display().to_string()];
    if let Ok(absolute) = std::path::absolute(data_dir) {
        forms.push(absolute.display().to_string());
    }
    if let Ok(canonical) = data_dir.canonicalize() {
        forms.push(canonical.display().to_string());
    }
    // Longest first, so an absolute form goes before the relative one inside it.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    let mut text = message.to_owned();
    for form in forms.iter().filter(|f| !f.is_empty() && f.as_str() != "/") {
        text = strip_prefix_paths(&text, form.trim_end_matches('/'));
    }
    text
}

/// Removes `dir/` where it starts a path: at the start of the text or after a character
/// that cannot be part of a path name.
fn strip_prefix_paths(text: &str, dir: &str) -> String {
    let needle = format!("{dir}/");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&needle) {
        let starts_path = rest[..at]
            .chars()
            .next_back()
            .or_else(|| out.chars().next_back())
            .is_none_or(|c| !(c.is_alphanumeric() || "_-./".contains(c)));
        out.push_str(&rest[..at]);
        if !starts_path {
            out.push_str(&needle);
        }
        rest = &rest[at + needle.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_directory_leaves_messages_in_every_form() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let shown = data.display();
        let message = format!(
            "{shown}/files/file_1/model.safetensors: tensor x is missing; see \"{shown}/jobs/j/checkpoints/step-4/config.json\""
        );
        let clean = without_server_paths(&message, &data);
        assert_eq!(
            clean,
            "files/file_1/model.safetensors: tensor x is missing; see \"jobs/j/checkpoints/step-4/config.json\""
        );
        // A relative data directory is taken out only where a path starts, not inside words.
        let relative =
            without_server_paths("data/files/f: bad; metadata/x stays", Path::new("data"));
        assert_eq!(relative, "files/f: bad; metadata/x stays");
    }
}
