//! Files built to hurt an extractor, each under the 10 MB object cap: recursion (self-referencing PDF
//! XObjects, HTML nested 100,000 deep), loops (a PDF page tree that is its own parent), decompression bombs
//! (PDF streams inflating to a gigabyte, DOCX with 60 MB of text), and amplification (JSON paths and CSV
//! headers repeated on every value). Every one must end as a `parse` dead letter with its reason, within a
//! bound, while another tenant's document is ingested and the service stays up.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{TestApp, eventually};

/// A PDF from its objects (numbered from 1), with a correct cross-reference table.
fn pdf(objects: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

fn stream(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut body = format!("<< {dict} /Length {} >>\nstream\n", data.len()).into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(b"\nendstream");
    body
}

const FONT: &str = "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>";

/// A page whose form XObject draws itself.
fn pdf_self_referencing_xobject() -> Vec<u8> {
    pdf(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /XObject << /X 5 0 R >> /Font << /F1 6 0 R >> >> >>".to_vec(),
        stream("", b"BT /F1 12 Tf (start) Tj ET /X Do"),
        stream(
            "/Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources << /XObject << /X 5 0 R >> /Font << /F1 6 0 R >> >>",
            b"BT /F1 12 Tf (again) Tj ET /X Do",
        ),
        FONT.as_bytes().to_vec(),
    ])
}

/// A page without its own resources, whose ancestors are each other's parents: looking up what it
/// inherits never ends.
fn pdf_parent_loop() -> Vec<u8> {
    pdf(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 /Parent 4 0 R >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /Contents 5 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [2 0 R] /Count 1 /Parent 2 0 R >>".to_vec(),
        stream("", b"BT /F1 12 Tf (loop) Tj ET"),
    ])
}

/// A page whose content stream inflates to `size` bytes of zeros.
fn pdf_flate_bomb(size: usize) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let block = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        encoder.write_all(&block).unwrap();
    }
    let bomb = encoder.finish().unwrap();
    pdf(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_vec(),
        stream("/Filter /FlateDecode", &bomb),
        FONT.as_bytes().to_vec(),
    ])
}

/// HTML nested `depth` deep in `open`/`close` pairs.
fn html_nested(open: &str, close: &str, depth: usize) -> Vec<u8> {
    let mut html = String::from("<html><body>");
    html.push_str(&open.repeat(depth));
    html.push_str("deep");
    html.push_str(&close.repeat(depth));
    html.push_str("</body></html>");
    html.into_bytes()
}

/// JSON whose long keys nest deep, above an array of many scalars: each scalar's line repeats the path.
fn json_path_amplification() -> Vec<u8> {
    let mut value = json!(vec![1; 20_000]);
    for level in 0..100 {
        value = json!({ format!("{level:03}{}", "k".repeat(600)): value });
    }
    serde_json::to_vec(&value).unwrap()
}

/// JSON of long paths over wide objects: every one of 50,000 values repeats a 30 kB path.
fn json_wide_keys() -> Vec<u8> {
    let leaves: serde_json::Map<String, serde_json::Value> =
        (0..50_000).map(|i| (format!("v{i}"), json!(i))).collect();
    let mut value = serde_json::Value::Object(leaves);
    for level in 0..50 {
        value = json!({ format!("{level:02}{}", "p".repeat(600)): value });
    }
    serde_json::to_vec(&value).unwrap()
}

/// CSV with 20,000 long headers and short rows: every value repeats its header.
fn csv_header_bomb() -> Vec<u8> {
    let headers: Vec<String> = (0..20_000)
        .map(|i| format!("header_{i:05}_{}", "h".repeat(30)))
        .collect();
    let mut csv = headers.join(",");
    csv.push('\n');
    let row = vec!["1"; 20_000].join(",");
    for _ in 0..200 {
        csv.push_str(&row);
        csv.push('\n');
    }
    csv.into_bytes()
}

/// A DOCX whose document.xml holds 60 MB of (compressible, but not suspiciously so) text.
fn docx_sixty_megabytes() -> Vec<u8> {
    let mut body = String::from(
        r#"<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>"#,
    );
    let mut n = 0u64;
    while body.len() < 60 << 20 {
        n += 1;
        body.push_str(&format!(
            "<w:p><w:r><w:t>Clause {n} binds party {} to deliver item {} by week {}.</w:t></w:r></w:p>",
            n * 7919 % 100_003,
            n * 104_729 % 1_000_003,
            n % 52
        ));
    }
    body.push_str("</w:body></w:document>");
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(9));
    writer.start_file("word/document.xml", options).unwrap();
    writer.write_all(body.as_bytes()).unwrap();
    writer.finish().unwrap().into_inner()
}

/// The corpus: (file name, bytes).
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let files = vec![
        ("xobject-loop.pdf", pdf_self_referencing_xobject()),
        ("parent-loop.pdf", pdf_parent_loop()),
        ("flate-bomb-1g.pdf", pdf_flate_bomb(1 << 30)),
        ("nested-div.html", html_nested("<div>", "</div>", 100_000)),
        (
            "nested-span.html",
            html_nested("<span>", "</span>", 100_000),
        ),
        (
            "nested-table.html",
            html_nested("<table><tr><td>", "</td></tr></table>", 33_000),
        ),
        ("nested-unclosed.html", html_nested("<b><i>", "", 50_000)),
        ("json-deep-paths.json", json_path_amplification()),
        ("json-wide-keys.json", json_wide_keys()),
        ("csv-header-bomb.csv", csv_header_bomb()),
        ("docx-60mb-text.docx", docx_sixty_megabytes()),
    ];
    for (name, bytes) in &files {
        assert!(
            bytes.len() < 10 << 20,
            "{name} is {} bytes, over the object cap",
            bytes.len()
        );
    }
    files
}

#[tokio::test]
async fn hostile_files_end_as_parse_dead_letters_while_other_tenants_documents_flow_and_the_service_stays_up()
 {
    let hostile = tempfile::tempdir().unwrap();
    for (name, bytes) in corpus() {
        std::fs::write(hostile.path().join(name), bytes).unwrap();
    }
    let friendly = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_with(
        &[
            ("ACTIVEKG_EXTRACT_MEMORY_MB", "512"),
            ("ACTIVEKG_EXTRACT_CPU_SECONDS", "5"),
            ("ACTIVEKG_EXTRACT_TIMEOUT_SECONDS", "10"),
        ],
        activekg::app::Roles::all(),
    )
    .await;
    for (tenant, dir) in [("mallory", hostile.path()), ("alice", friendly.path())] {
        let response = app
            .admin_post(
                "/_admin/connectors/local/register",
                &json!({"tenant_id": tenant, "config": {"path": dir}}),
            )
            .await;
        assert_eq!(response.status(), 201);
    }
    let started = Instant::now();
    let response = app
        .admin_post(
            "/_admin/connectors/local/backfill",
            &json!({"tenant_id": "mallory"}),
        )
        .await;
    assert!(response.status().is_success());

    // While the hostile files are being refused, another tenant's document goes through.
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(
        friendly.path().join("memo.txt"),
        "Lunch is at noon on Friday.",
    )
    .unwrap();
    let response = app
        .admin_post(
            "/_admin/connectors/local/backfill",
            &json!({"tenant_id": "alice"}),
        )
        .await;
    assert!(response.status().is_success());
    let alice_ready = eventually(
        Duration::from_secs(60),
        "alice's document to be ingested",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM nodes WHERE tenant_id = 'alice' AND entity_type = 'Document'",
            )
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
            (n == 1).then(|| started.elapsed())
        },
    )
    .await;

    let files = corpus().len() as i64;
    let dead: Vec<(String, String, String)> = eventually(
        Duration::from_secs(240),
        "every hostile file to be dead-lettered",
        || async {
            let dead: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT args->>'key', errors -> -1 ->> 'code', errors -> -1 ->> 'error' FROM jobs
                 WHERE kind = 'ingest_object' AND tenant_id = 'mallory' AND state = 'dead' ORDER BY 1",
            )
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
            (dead.len() as i64 == files).then_some(dead)
        },
    )
    .await;
    let took = started.elapsed();
    for (key, _, error) in &dead {
        eprintln!("{key}: {error}");
    }
    for (key, code, error) in &dead {
        assert_eq!(code, "parse", "{key}: {error}");
    }
    let documents: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes WHERE tenant_id = 'mallory' AND entity_type = 'Document'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(documents, 0, "nothing half-written");
    assert_eq!(app.get("/health").await.status(), 200, "the service is up");
    eprintln!(
        "alice's document was ready after {alice_ready:?}; all {files} hostile files refused after {took:?}"
    );
    app.stop().await;
}
