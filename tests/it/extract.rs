//! Text extraction from every supported format, and refusal of corrupt, unsupported and hostile files.

use activekg::extract::{ExtractError, Format, extract};

use crate::fixtures;

#[test]
fn pdf_text_is_extracted() {
    let bytes = fixtures::pdf(&["Quarterly report (draft)", "Revenue grew by 12 percent."]);
    let out = extract(&bytes, Some("application/pdf"), "reports/q4.pdf").unwrap();
    assert_eq!(out.format, Format::Pdf);
    assert!(
        out.text.contains("Quarterly report (draft)"),
        "{:?}",
        out.text
    );
    assert!(
        out.text.contains("Revenue grew by 12 percent."),
        "{:?}",
        out.text
    );
}

#[test]
fn a_corrupt_pdf_is_a_parse_error_not_garbage() {
    let err = extract(&fixtures::corrupt_pdf(), None, "broken.pdf").unwrap_err();
    assert!(
        matches!(
            err,
            ExtractError::Corrupt {
                format: Format::Pdf,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn docx_paragraphs_and_title_are_extracted() {
    let bytes = fixtures::docx(
        "Handbook",
        &["Welcome to ACME & friends.", "Second <paragraph>."],
    );
    let out = extract(&bytes, None, "hr/handbook.docx").unwrap();
    assert_eq!(out.title.as_deref(), Some("Handbook"));
    assert_eq!(out.text, "Welcome to ACME & friends.\nSecond <paragraph>.");
}

#[test]
fn a_docx_zip_bomb_is_refused() {
    let err = extract(&fixtures::docx_bomb(20 * 1024 * 1024), None, "bomb.docx").unwrap_err();
    assert!(err.to_string().contains("zip bomb"), "{err}");
    let err = extract(b"PK\x03\x04 not really a zip", None, "fake.docx").unwrap_err();
    assert!(
        matches!(
            err,
            ExtractError::Corrupt {
                format: Format::Docx,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn html_keeps_visible_text_and_drops_scripts_and_styles() {
    let html = r#"<html><head><title>Release notes</title><style>body { color: red }</style></head>
        <body><h1>Version 2</h1><script>alert("x")</script><p>Faster <b>imports</b>.</p>
        <noscript>enable js</noscript><ul><li>One</li><li>Two</li></ul></body></html>"#;
    let out = extract(
        html.as_bytes(),
        Some("text/html; charset=utf-8"),
        "notes.html",
    )
    .unwrap();
    assert_eq!(out.title.as_deref(), Some("Release notes"));
    assert!(
        out.text.contains("Version 2") && out.text.contains("Faster imports."),
        "{:?}",
        out.text
    );
    for hidden in ["alert", "color: red", "enable js"] {
        assert!(
            !out.text.contains(hidden),
            "{hidden} leaked into {:?}",
            out.text
        );
    }
}

#[test]
fn markdown_json_csv_and_text_are_read() {
    let md = extract(
        b"# Guide\n\nUse `cargo run`.\n\n- a\n- b\n",
        None,
        "docs/guide.md",
    )
    .unwrap();
    assert_eq!(md.title.as_deref(), Some("Guide"));
    assert!(md.text.contains("Use cargo run."), "{:?}", md.text);

    let json = extract(
        br#"{"name": "Widget", "tags": ["a", "b"], "price": 3.5, "meta": null}"#,
        None,
        "x.json",
    )
    .unwrap();
    assert_eq!(
        json.text,
        "name: Widget\nprice: 3.5\ntags[0]: a\ntags[1]: b"
    );

    let csv = extract(
        b"city,population\nParis,2100000\nLyon,,\n",
        None,
        "cities.csv",
    )
    .unwrap();
    assert_eq!(csv.text, "city: Paris; population: 2100000\ncity: Lyon");

    let text = extract(
        "\u{feff}Plain  text\r\nline two\n\n\n\nend".as_bytes(),
        Some("text/plain"),
        "a.txt",
    )
    .unwrap();
    assert_eq!(text.text, "Plain  text\nline two\n\nend");
}

#[test]
fn unsupported_binary_and_invalid_inputs_are_refused_with_reasons() {
    let err = extract(b"\x89PNG\r\n\x1a\n", Some("image/png"), "logo.png").unwrap_err();
    assert!(matches!(err, ExtractError::Unsupported { .. }), "{err}");
    let err = extract(b"text\0with nul", None, "odd.txt").unwrap_err();
    assert!(err.to_string().contains("binary"), "{err}");
    let err = extract(b"\xff\xfe\xfd", None, "latin.txt").unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
    let err = extract(b"{\"open\": ", None, "bad.json").unwrap_err();
    assert!(err.to_string().contains("JSON"), "{err}");
}

#[test]
fn content_type_wins_over_extension_and_generic_types_fall_back_to_it() {
    assert_eq!(
        Format::detect(Some("text/markdown"), "notes.txt", b""),
        Some(Format::Markdown)
    );
    assert_eq!(
        Format::detect(Some("application/octet-stream"), "notes.txt", b""),
        Some(Format::Text)
    );
    assert_eq!(
        Format::detect(None, "no-extension", b"%PDF-1.7"),
        Some(Format::Pdf)
    );
    assert_eq!(Format::detect(None, "no-extension", b"hello"), None);
}
