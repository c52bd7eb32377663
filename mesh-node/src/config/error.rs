//! Problems found while loading, and the error that carries all of them.

use std::fmt;

use super::field_path::FieldPath;

/// One thing wrong with the input, rendered as
/// `<file>: <Kind> <namespace>/<name>: <field.path>: <message>`.
/// Parts that do not apply (no object yet, no field) are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path relative to the loaded directory, so messages stay short and stable.
    pub file: String,
    /// 1-based line and column, for YAML syntax errors.
    pub location: Option<(usize, usize)>,
    /// `Kind namespace/name`, `Kind name` for cluster-scoped kinds, or
    /// `document N` when the object cannot be named.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Loading failed; holds every problem found, not only the first.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .lines.join("\n"))]
pub struct ConfigError {
    lines: Vec<String>,
    details: Vec<Problem>,
}

impl ConfigError {
    pub(crate) fn new(details: Vec<Problem>) -> Self {
        let lines = details.iter().map(ToString::to_string).collect();
        Self { lines, details }
    }

    /// One rendered line per problem, in file order.
    pub fn problems(&self) -> &[String] {
        &self.lines
    }

    /// The same problems, structured.
    pub fn details(&self) -> &[Problem] {
        &self.details
    }
}

/// Collects problems for one object so validators only supply path and message.
pub(crate) struct Reporter<'a> {
    file: &'a str,
    object: &'a str,
    sink: &'a mut Vec<Problem>,
    /// Where [`Reporter::warn`] goes; without it a warning is an error, so a caller that
    /// does not expect warnings never applies an object it did not look at.
    warnings: Option<&'a mut Vec<Problem>>,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(file: &'a str, object: &'a str, sink: &'a mut Vec<Problem>) -> Self {
        Self { file, object, sink, warnings: None }
    }

    /// A reporter whose warnings go to `warnings` instead of `sink`.
    pub(crate) fn with_warnings(
        file: &'a str,
        object: &'a str,
        sink: &'a mut Vec<Problem>,
        warnings: &'a mut Vec<Problem>,
    ) -> Self {
        Self { file, object, sink, warnings: Some(warnings) }
    }

    pub(crate) fn at(&mut self, field: &FieldPath, message: impl Into<String>) {
        let problem = self.problem(field, message.into());
        self.sink.push(problem);
    }

    /// Something the object asks for that is applied differently (more restrictively) than
    /// written: reported, but the object is applied.
    pub(crate) fn warn(&mut self, field: &FieldPath, message: impl Into<String>) {
        let problem = self.problem(field, message.into());
        match self.warnings.as_deref_mut() {
            Some(warnings) => warnings.push(problem),
            None => self.sink.push(problem),
        }
    }

    fn problem(&self, field: &FieldPath, message: String) -> Problem {
        Problem {
            file: self.file.to_string(),
            location: None,
            object: Some(self.object.to_string()),
            field: (!field.is_empty()).then(|| field.to_string()),
            message,
        }
    }

    /// Number of problems recorded so far (by anyone), to tell whether a step added any.
    pub(crate) fn count(&self) -> usize {
        self.sink.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_parts() {
        let p = Problem {
            file: "recall.yaml".into(),
            location: None,
            object: Some("DestinationRule default/recall".into()),
            field: Some("trafficPolicy.outlierDetection.interval".into()),
            message: "\"ten\" is not a duration".into(),
        };
        assert_eq!(
            p.to_string(),
            "recall.yaml: DestinationRule default/recall: trafficPolicy.outlierDetection.interval: \"ten\" is not a duration"
        );
        let syntax = Problem {
            file: "bad.yaml".into(),
            location: Some((3, 7)),
            object: None,
            field: None,
            message: "invalid YAML".into(),
        };
        assert_eq!(syntax.to_string(), "bad.yaml:3:7: invalid YAML");
        let err = ConfigError::new(vec![p, syntax]);
        assert_eq!(err.problems().len(), 2);
        assert_eq!(err.to_string().lines().count(), 2);
    }
}
