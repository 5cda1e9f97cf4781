//! One function per format. Each returns the text (and a title when the format has one) or the reason the
//! bytes are not a readable document of that format.

use std::io::Read;
use std::panic::AssertUnwindSafe;

use quick_xml::events::Event;

/// Most bytes a DOCX part may inflate to: a zip bomb stops here, however it is declared.
const DOCX_PART_LIMIT: u64 = 64 * 1024 * 1024;
/// Most inflation a DOCX part may claim relative to its compressed size.
const DOCX_MAX_RATIO: u64 = 200;
/// Most entries a DOCX archive may have.
const DOCX_MAX_ENTRIES: usize = 10_000;

/// Deepest element nesting an HTML page may have.
const HTML_MAX_DEPTH: usize = 512;

/// Text taken out of a document, bounded: formats that repeat their input (JSON paths, CSV headers) or
/// inflate it (DOCX, PDF streams) cannot turn a small file into an unbounded amount of text.
pub(super) struct Text {
    out: String,
    limit: usize,
}

impl Text {
    /// A budget of `limit` bytes.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            out: String::new(),
            limit,
        }
    }

    /// Appends, or says the document's text is over the budget.
    pub(super) fn push(&mut self, text: &str) -> Result<(), String> {
        if self.out.len() + text.len() > self.limit {
            return Err(over_budget(self.limit));
        }
        self.out.push_str(text);
        Ok(())
    }

    fn ends_with(&self, pattern: &[char]) -> bool {
        self.out.ends_with(pattern)
    }

    fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    pub(super) fn into_string(self) -> String {
        self.out
    }
}

pub(super) fn over_budget(limit: usize) -> String {
    format!(
        "its text is longer than {} MiB (the limit for a file of this size): refusing a likely amplification",
        limit >> 20
    )
}

/// Normalizes line endings and trims trailing whitespace on each line; at most one blank line in a row.
pub(super) fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.replace("\r\n", "\n").replace('\r', "\n").lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank += 1;
            if blank > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim_end().to_owned()
}

/// UTF-8 text (a leading BOM is dropped); binary content is refused rather than read as garbage.
pub(super) fn utf8(bytes: &[u8]) -> Result<String, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.contains(&0) {
        return Err("the file contains NUL bytes: it is binary, not text".to_owned());
    }
    String::from_utf8(bytes.to_vec()).map_err(|e| format!("the file is not UTF-8 text ({e})"))
}

/// The PDF parser's own recursion and decompression are not bounded here: extraction runs in a child
/// process whose stack, memory and CPU time are (see `extract::sandbox`).
pub(super) fn pdf(bytes: &[u8], limit: usize) -> Result<String, String> {
    if !bytes.starts_with(b"%PDF-") {
        return Err("it does not start with a PDF header".to_owned());
    }
    // The PDF parser panics on some malformed files; a panic is a corrupt file, not a crashed worker.
    match std::panic::catch_unwind(AssertUnwindSafe(|| {
        pdf_extract::extract_text_from_mem(bytes)
    })) {
        Ok(Ok(text)) if text.len() > limit => Err(over_budget(limit)),
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the PDF parser could not make sense of it".to_owned()),
    }
}

/// Reads one part of a DOCX archive, refusing parts that inflate beyond the limits.
fn docx_part(
    archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
) -> Result<Option<Vec<u8>>, String> {
    let mut file = match archive.by_name(name) {
        Ok(file) => file,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(format!("cannot open {name}: {e}")),
    };
    let declared = file.size();
    let compressed = file.compressed_size().max(1);
    if declared > DOCX_PART_LIMIT || declared / compressed > DOCX_MAX_RATIO {
        return Err(format!(
            "{name} would inflate to {declared} bytes from {compressed}: refusing a likely zip bomb"
        ));
    }
    let mut content = Vec::new();
    // The declared size can lie; never inflate more than the limit whatever it says.
    file.by_ref()
        .take(DOCX_PART_LIMIT + 1)
        .read_to_end(&mut content)
        .map_err(|e| format!("cannot inflate {name}: {e}"))?;
    if content.len() as u64 > DOCX_PART_LIMIT {
        return Err(format!(
            "{name} inflates beyond {DOCX_PART_LIMIT} bytes: refusing a likely zip bomb"
        ));
    }
    Ok(Some(content))
}

/// Text inside `<w:t>` runs, with paragraphs, breaks and tabs kept; plus the core properties' title.
pub(super) fn docx(bytes: &[u8], limit: usize) -> Result<(String, Option<String>), String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a valid DOCX (zip) archive: {e}"))?;
    if archive.len() > DOCX_MAX_ENTRIES {
        return Err(format!(
            "{} entries in the archive: refusing",
            archive.len()
        ));
    }
    let document = docx_part(&mut archive, "word/document.xml")?
        .ok_or_else(|| "no word/document.xml: not a Word document".to_owned())?;
    let text = xml_text(
        &document,
        limit,
        |name| name == b"t",
        |name| match name {
            b"p" => Some("\n"),
            b"br" | b"cr" => Some("\n"),
            b"tab" => Some("\t"),
            _ => None,
        },
    )?;
    let title = match docx_part(&mut archive, "docProps/core.xml")? {
        Some(core) => Some(xml_text(
            &core,
            64 * 1024,
            |name| name == b"title",
            |_| None,
        )?),
        None => None,
    };
    Ok((text, title))
}

/// Collects the text inside elements `keep` selects, adding `separator(name)` after elements that end
/// (or empty elements) with a separator.
fn xml_text(
    xml: &[u8],
    limit: usize,
    keep: impl Fn(&[u8]) -> bool,
    separator: impl Fn(&[u8]) -> Option<&'static str>,
) -> Result<String, String> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buffer = Vec::new();
    let mut text = Text::new(limit);
    let mut depth_in_kept = 0usize;
    loop {
        let event = reader
            .read_event_into(&mut buffer)
            .map_err(|e| format!("malformed XML at byte {}: {e}", reader.buffer_position()))?;
        match event {
            Event::Start(e) if keep(e.local_name().as_ref()) => depth_in_kept += 1,
            Event::End(e) => {
                let name = e.local_name();
                if keep(name.as_ref()) {
                    depth_in_kept = depth_in_kept.saturating_sub(1);
                }
                if let Some(sep) = separator(name.as_ref()) {
                    text.push(sep)?;
                }
            }
            Event::Empty(e) => {
                if let Some(sep) = separator(e.local_name().as_ref()) {
                    text.push(sep)?;
                }
            }
            Event::Text(t) if depth_in_kept > 0 => {
                text.push(
                    &t.xml_content()
                        .map_err(|e| format!("bad text encoding: {e}"))?,
                )?;
            }
            Event::CData(t) if depth_in_kept > 0 => {
                text.push(&String::from_utf8_lossy(&t.into_inner()))?;
            }
            Event::GeneralRef(r) if depth_in_kept > 0 => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => Some(c.to_string()),
                    _ => r.decode().ok().and_then(|name| {
                        quick_xml::escape::resolve_predefined_entity(&name).map(str::to_owned)
                    }),
                };
                text.push(&resolved.ok_or_else(|| "an unknown entity reference".to_owned())?)?;
            }
            Event::Eof => break,
            _ => {}
        }
        buffer.clear();
    }
    Ok(text.into_string())
}

/// Visible text; scripts, styles and other non-content elements are dropped; block elements end lines.
/// The tree is walked without recursion, so no nesting depth can exhaust the stack.
pub(super) fn html(source: &str, limit: usize) -> Result<(String, Option<String>), String> {
    use ego_tree::iter::Edge;
    const SKIP: &[&str] = &[
        "script", "style", "noscript", "template", "head", "svg", "iframe", "object",
    ];
    const BLOCK: &[&str] = &[
        "p",
        "div",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "section",
        "article",
        "header",
        "footer",
        "pre",
        "blockquote",
        "table",
        "ul",
        "ol",
        "dd",
        "dt",
        "hr",
        "main",
        "nav",
        "aside",
    ];
    let document = scraper::Html::parse_document(source);
    let title = document
        .select(&scraper::Selector::parse("title").expect("a valid selector"))
        .next()
        .map(|t| t.text().take(64).collect::<String>().trim().to_owned());
    let mut text = Text::new(limit);
    let body = document
        .select(&scraper::Selector::parse("body").expect("a valid selector"))
        .next()
        .unwrap_or_else(|| document.root_element());
    // Depth inside a skipped element (0: not skipping), and nesting depth (no real page nests this deep).
    let (mut skipping, mut depth) = (0usize, 0usize);
    for edge in body.traverse() {
        match edge {
            Edge::Open(node) if node.value().is_element() && depth == HTML_MAX_DEPTH => {
                return Err(format!(
                    "elements are nested more than {HTML_MAX_DEPTH} deep: refusing it"
                ));
            }
            Edge::Open(node) => match node.value() {
                scraper::Node::Element(_) if skipping > 0 => {
                    depth += 1;
                    skipping += 1;
                }
                scraper::Node::Element(e) if SKIP.contains(&e.name()) => {
                    depth += 1;
                    skipping = 1;
                }
                scraper::Node::Element(_) => depth += 1,
                scraper::Node::Text(t) if skipping == 0 => {
                    let collapsed = t.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !collapsed.is_empty() {
                        if !text.is_empty()
                            && !text.ends_with(&['\n', ' '])
                            && t.starts_with(char::is_whitespace)
                        {
                            text.push(" ")?;
                        }
                        text.push(&collapsed)?;
                        if t.ends_with(char::is_whitespace) {
                            text.push(" ")?;
                        }
                    }
                }
                _ => {}
            },
            Edge::Close(node) => {
                if let scraper::Node::Element(e) = node.value() {
                    depth -= 1;
                    if skipping > 0 {
                        skipping -= 1;
                    } else if BLOCK.contains(&e.name()) && !text.ends_with(&['\n']) {
                        text.push("\n")?;
                    }
                }
            }
        }
    }
    Ok((text.into_string(), title))
}

/// Text of the Markdown, with blocks on their own lines; the first level-one heading is the title.
pub(super) fn markdown(source: &str, limit: usize) -> Result<(String, Option<String>), String> {
    use pulldown_cmark::{Event as Md, HeadingLevel, Parser, Tag, TagEnd};
    let mut text = Text::new(limit);
    let mut title: Option<String> = None;
    let mut in_h1 = false;
    let mut h1 = String::new();
    for event in Parser::new(source) {
        match event {
            Md::Start(Tag::Heading {
                level: HeadingLevel::H1,
                ..
            }) => in_h1 = true,
            Md::End(TagEnd::Heading(HeadingLevel::H1)) => {
                in_h1 = false;
                if title.is_none() && !h1.trim().is_empty() {
                    title = Some(h1.trim().to_owned());
                }
                text.push("\n")?;
            }
            Md::Text(t) | Md::Code(t) | Md::InlineHtml(t) => {
                if in_h1 && h1.len() < 4096 {
                    h1.push_str(&t);
                }
                text.push(&t)?;
            }
            Md::SoftBreak => text.push(" ")?,
            Md::HardBreak => text.push("\n")?,
            Md::End(
                TagEnd::Paragraph
                | TagEnd::Heading(_)
                | TagEnd::Item
                | TagEnd::CodeBlock
                | TagEnd::TableRow,
            ) => text.push("\n")?,
            Md::End(TagEnd::TableCell) => text.push("\t")?,
            _ => {}
        }
    }
    Ok((text.into_string(), title))
}

/// One `path: value` line per scalar, so the text keeps which field said what. Nesting is bounded by the
/// JSON parser (128 levels), the output by the budget: paths repeat their prefix on every line.
pub(super) fn json(bytes: &[u8], limit: usize) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let mut text = Text::new(limit);
    flatten(&value, &mut String::new(), &mut text)?;
    Ok(text.into_string())
}

fn flatten(value: &serde_json::Value, path: &mut String, text: &mut Text) -> Result<(), String> {
    let line = |text: &mut Text, path: &str, scalar: &str| {
        if !text.is_empty() {
            text.push("\n")?;
        }
        if !path.is_empty() {
            text.push(path)?;
            text.push(": ")?;
        }
        text.push(scalar)
    };
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                let before = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                flatten(v, path, text)?;
                path.truncate(before);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let before = path.len();
                path.push_str(&format!("[{i}]"));
                flatten(v, path, text)?;
                path.truncate(before);
            }
        }
        serde_json::Value::Null => {}
        serde_json::Value::String(s) => line(text, path, s)?,
        scalar => line(text, path, &scalar.to_string())?,
    }
    Ok(())
}

/// One line per row, `header: value` pairs joined with `; `, so each row reads on its own. Headers repeat
/// on every row, so the output is held to the budget.
pub(super) fn csv(bytes: &[u8], limit: usize) -> Result<String, String> {
    let text = utf8(bytes)?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("not valid CSV: {e}"))?
        .iter()
        .map(str::to_owned)
        .collect();
    let mut text = Text::new(limit);
    for record in reader.records() {
        let record = record.map_err(|e| format!("not valid CSV: {e}"))?;
        let mut first = true;
        for (i, value) in record.iter().enumerate() {
            if value.trim().is_empty() {
                continue;
            }
            if first {
                if !text.is_empty() {
                    text.push("\n")?;
                }
                first = false;
            } else {
                text.push("; ")?;
            }
            if let Some(header) = headers.get(i).filter(|h| !h.is_empty()) {
                text.push(header)?;
                text.push(": ")?;
            }
            text.push(value)?;
        }
    }
    Ok(text.into_string())
}
