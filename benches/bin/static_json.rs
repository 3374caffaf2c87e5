//! The ceiling of the HTTP stack for the read benchmark: the API's own middleware and server serving a
//! fixed JSON body (read from the file given as the first argument, so it has the product's size) on
//! the address given as the second argument.

use axum::Router;
use axum::http::header;
use axum::routing::get;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let body_file = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: static-json BODY_FILE ADDR"))?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18082".into());
    let body = bytes::Bytes::from(std::fs::read(&body_file)?);
    let config = api::Config::parse_from(["static-json"]);
    let routes = Router::new().route(
        "/products/{id}",
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let app = api::with_middleware(routes, &config);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
