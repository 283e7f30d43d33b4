# Build: the release binary (no database needed at build time: the queries are checked
# at run time and the migrations are embedded by sqlx::migrate!).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked && strip target/release/report-worker

# Run: a small Debian with CA certificates for the provider's HTTPS.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 report-worker
COPY --from=build /src/target/release/report-worker /usr/local/bin/report-worker
USER report-worker
ENTRYPOINT ["report-worker"]
CMD ["run"]
