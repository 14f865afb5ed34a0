//! What a connection's bytes may do: an idle deadline for every connection, and a header deadline
//! for HTTP/1.1 that answers a request head too slow to finish with a 408.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// A connection's bytes, ended (a read error) once neither direction has moved for `idle`: an
/// idle keep-alive connection, a silent HTTP/2 connection, or one that never sends its first
/// byte cannot hold a socket and its memory forever.
pub(crate) struct IdleIo<T> {
    inner: T,
    deadline: IdleDeadline,
}

impl<T> IdleIo<T> {
    pub(crate) fn new(inner: T, idle: Duration) -> Self {
        IdleIo {
            inner,
            deadline: IdleDeadline::new(idle),
        }
    }

    fn moved(&mut self) {
        self.deadline.moved();
    }
}

/// A deadline `idle` after the last sign of life: for connections and upstream answers that
/// must not hold their place once nothing moves.
pub(crate) struct IdleDeadline {
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleDeadline {
    pub(crate) fn new(idle: Duration) -> Self {
        IdleDeadline {
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Something moved: the deadline starts again.
    pub(crate) fn moved(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.sleep.as_mut().reset(next);
    }

    /// Whether the deadline passed (registers `cx` to be woken when it does).
    pub(crate) fn passed(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                std::task::Poll::Ready(result)
            }
            std::task::Poll::Pending if self.deadline.passed(cx) => std::task::Poll::Ready(Err(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle"),
            )),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        result
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection's exchanges as its service sees them: request heads handed to the service, and
/// answers whose body has ended (or was dropped). Equal counts: nothing in progress.
#[derive(Default)]
pub(crate) struct Exchanges {
    heads: AtomicU64,
    ended: AtomicU64,
}

impl Exchanges {
    /// A request head arrived; the guard counts its answer ended when dropped.
    pub(crate) fn started(self: &Arc<Self>) -> ExchangeGuard {
        self.heads.fetch_add(1, Ordering::Release);
        ExchangeGuard(self.clone())
    }

    fn heads(&self) -> u64 {
        self.heads.load(Ordering::Acquire)
    }

    fn idle(&self) -> bool {
        self.ended.load(Ordering::Acquire) == self.heads()
    }
}

pub(crate) struct ExchangeGuard(Arc<Exchanges>);

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Release);
    }
}

/// An answer's body that counts its exchange ended when hyper is done with it.
pub(crate) struct Tracked<B> {
    inner: B,
    _guard: ExchangeGuard,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, guard: ExchangeGuard) -> Self {
        Tracked {
            inner,
            _guard: guard,
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What hyper's own header timeout does (the next request head must arrive within `limit` of
/// the connection opening or the last answer ending), except that a head begun and not
/// finished is answered with a JSON 408 before the connection closes, rather than dropped.
/// Only for HTTP/1.1: a connection that opens with the HTTP/2 preface is left alone (its
/// streams are bounded by the idle deadline and h2's own limits).
pub(crate) struct HeadDeadline<T> {
    inner: T,
    exchanges: Arc<Exchanges>,
    limit: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    state: HeadState,
    /// Bytes of the next head have arrived since the clock started.
    head_begun: bool,
    /// Bytes the connection has read so far, up to the HTTP/2 preface's first four.
    first: Vec<u8>,
    /// How much of `TIMEOUT_ANSWER` is written, once the deadline passed mid-head.
    answered: Option<usize>,
}

#[derive(Clone, Copy, PartialEq)]
enum HeadState {
    /// Waiting for the head that follows this many heads.
    Waiting { after: u64 },
    /// A request is in progress (its body, its answer).
    Busy,
    /// HTTP/2: not watched.
    Off,
}

const H2_PREFACE_START: &[u8] = b"PRI ";
const TIMEOUT_ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 27\r\nconnection: close\r\n\r\n{\"error\":\"request_timeout\"}";

impl<T> HeadDeadline<T> {
    pub(crate) fn new(inner: T, exchanges: Arc<Exchanges>, limit: Duration) -> Self {
        HeadDeadline {
            inner,
            exchanges,
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            state: HeadState::Waiting { after: 0 },
            head_begun: false,
            first: Vec::new(),
            answered: None,
        }
    }

    /// Follows the service's view: a head arrived (busy), or every answer ended (the clock
    /// starts again for the next head).
    fn follow(&mut self) {
        let heads = self.exchanges.heads();
        match self.state {
            HeadState::Off => {}
            HeadState::Waiting { after } if after == heads => {}
            _ if self.exchanges.idle() => {
                self.state = HeadState::Waiting { after: heads };
                self.head_begun = false;
                let next = tokio::time::Instant::now() + self.limit;
                self.sleep.as_mut().reset(next);
            }
            _ => self.state = HeadState::Busy,
        }
    }

    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.first.len() < H2_PREFACE_START.len() {
            let take = (H2_PREFACE_START.len() - self.first.len()).min(bytes.len());
            self.first.extend_from_slice(&bytes[..take]);
            if self.first.as_slice() == H2_PREFACE_START {
                self.state = HeadState::Off;
                return;
            }
        }
        if matches!(self.state, HeadState::Waiting { .. }) {
            self.head_begun = true;
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(written) = this.answered {
            return this.answer(cx, written);
        }
        this.follow();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if !matches!(this.state, HeadState::Waiting { .. })
                    || this.sleep.as_mut().poll(cx).is_pending()
                {
                    return Poll::Pending;
                }
                if !this.head_begun {
                    return Poll::Ready(Err(timed_out()));
                }
                this.answer(cx, 0)
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> HeadDeadline<T> {
    /// Writes the 408 (from `written` on), then ends the read with an error so hyper closes.
    fn answer(&mut self, cx: &mut Context<'_>, mut written: usize) -> Poll<std::io::Result<()>> {
        while written < TIMEOUT_ANSWER.len() {
            self.answered = Some(written);
            match Pin::new(&mut self.inner).poll_write(cx, &TIMEOUT_ANSWER[written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(timed_out())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        self.answered = Some(written);
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Err(timed_out())),
        }
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "request head too slow")
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection's service, counting its exchanges for the connection's `HeadDeadline`.
pub(crate) struct Counted<S> {
    inner: S,
    exchanges: Arc<Exchanges>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, exchanges: Arc<Exchanges>) -> Self {
        Counted { inner, exchanges }
    }
}

type AnswerBody = crate::answer::Body;

impl<S> hyper::service::Service<http::Request<hyper::body::Incoming>> for Counted<S>
where
    S: hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<AnswerBody>,
    >,
{
    type Response = http::Response<AnswerBody>;
    type Error = S::Error;
    type Future = CountedCall<S::Future>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        CountedCall {
            guard: Some(self.exchanges.started()),
            call: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    pub(crate) struct CountedCall<F> {
        #[pin]
        call: F,
        guard: Option<ExchangeGuard>,
    }
}

impl<F, E> Future for CountedCall<F>
where
    F: Future<Output = Result<http::Response<AnswerBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.call.poll(cx))?;
        Poll::Ready(Ok(match this.guard.take() {
            Some(guard) => answer.map(|body| AnswerBody::new(Tracked::new(body, guard))),
            None => answer,
        }))
    }
}
