"""Optional native CPU kernels for the fused norm + clone expansion (built on first use with the C compiler).

The kernels are plain C (no Python or torch headers), compiled once per machine into a small shared library in
a cache folder (``$EGG_OPTIM_CACHE``, default ``~/.cache/egg_optim``) and called through :mod:`ctypes`, which
releases the GIL. Each call splits the batch over ``torch.get_num_threads()`` threads (OpenMP, else pthreads).
Without a compiler, or
with ``EGG_OPTIM_NO_KERNEL=1``, :func:`load` returns ``None`` and the caller uses torch ops (same results within
float rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXT 64
typedef struct {
    int kind, dbl;
    const void *x, *gy; void *out;
    const int64_t *g; const double *s, *t, *p, *q;
    double *acc1, *acc2;
    int64_t n0, n1, A, C, S;
} job_t;

/* kind 0 forward  : out[n,c,:] = x[n,g[c],:] * s[c] + t[c]                        (x: N,A,S; out: N,C,S)
   kind 1 reduce   : acc1[c] += sum gy[n,c,:]; acc2[c] += sum gy[n,c,:] * (x[n,g[c],:] - t[c])
   kind 2 grad in  : out[n,a,:] = x[n,a,:] * p[a] + q[a] + sum_{c: g[c]=a} gy[n,c,:] * s[c]   (out: N,A,S)
   kind 3 stats    : acc1[a] += sum (x[n,a,:] - k[a]); acc2[a] += sum (x[n,a,:] - k[a])^2, k[a] = x[0,a,0] */
#define KERNELS(T, SUF) \
static void k0_##SUF(job_t *j) { \
    const T *x = (const T *)j->x; T *out = (T *)j->out; \
    for (int64_t n = j->n0; n < j->n1; n++) { \
        const T *xn = x + n * j->A * j->S; T *on = out + n * j->C * j->S; \
        for (int64_t c = 0; c < j->C; c++) { \
            const T *src = xn + j->g[c] * j->S; T *dst = on + c * j->S; \
            const T sc = (T)j->s[c], tc = (T)j->t[c]; \
            _Pragma("omp simd") for (int64_t i = 0; i < j->S; i++) dst[i] = src[i] * sc + tc; \
        } \
    } \
} \
static void k1_##SUF(job_t *j) { \
    const T *x = (const T *)j->x, *gy = (const T *)j->gy; \
    for (int64_t n = j->n0; n < j->n1; n++) { \
        const T *xn = x + n * j->A * j->S, *gn = gy + n * j->C * j->S; \
        for (int64_t c = 0; c < j->C; c++) { \
            const T *src = xn + j->g[c] * j->S, *gc = gn + c * j->S; \
            const T mc = (T)j->t[c]; T s1 = 0, s2 = 0; \
            _Pragma("omp simd reduction(+:s1,s2)") \
            for (int64_t i = 0; i < j->S; i++) { s1 += gc[i]; s2 += gc[i] * (src[i] - mc); } \
            j->acc1[c] += (double)s1; j->acc2[c] += (double)s2; \
        } \
    } \
} \
static void k2_##SUF(job_t *j) { \
    const T *x = (const T *)j->x, *gy = (const T *)j->gy; T *out = (T *)j->out; \
    for (int64_t n = j->n0; n < j->n1; n++) { \
        const T *xn = x + n * j->A * j->S, *gn = gy + n * j->C * j->S; T *on = out + n * j->A * j->S; \
        for (int64_t a = 0; a < j->A; a++) { \
            const T pa = (T)j->p[a], qa = (T)j->q[a]; const T *xa = xn + a * j->S; T *oa = on + a * j->S; \
            _Pragma("omp simd") for (int64_t i = 0; i < j->S; i++) oa[i] = xa[i] * pa + qa; \
        } \
        for (int64_t c = 0; c < j->C; c++) { \
            T *oa = on + j->g[c] * j->S; const T *gc = gn + c * j->S; const T sc = (T)j->s[c]; \
            _Pragma("omp simd") for (int64_t i = 0; i < j->S; i++) oa[i] += gc[i] * sc; \
        } \
    } \
} \
static void k3_##SUF(job_t *j) { \
    const T *x = (const T *)j->x; \
    for (int64_t n = j->n0; n < j->n1; n++) { \
        const T *xn = x + n * j->A * j->S; \
        for (int64_t a = 0; a < j->A; a++) { \
            const T *xa = xn + a * j->S; const T k = x[a * j->S]; T s1 = 0, s2 = 0; \
            _Pragma("omp simd reduction(+:s1,s2)") \
            for (int64_t i = 0; i < j->S; i++) { T d = xa[i] - k; s1 += d; s2 += d * d; } \
            j->acc1[a] += (double)s1; j->acc2[a] += (double)s2; \
        } \
    } \
}

/* Rows layout (channels last): x is (R, A), gy/out (R, C), one row per batch position; the same four kernels
   (kinds 4-7 = 0-3 with S = 1), vectorised over channels, with per-channel vectors converted to T (and the
   gather index to int32: several times faster gathers than int64 at these widths) once per job, and sums kept
   in T over blocks of ROWB rows before they are added in double (as kinds 1 and 3 do per row). */
#define ROWB 64
static int32_t *idx32(const int64_t *g, int64_t n) {
    int32_t *o = (int32_t *)malloc(sizeof(int32_t) * (n > 0 ? n : 1));
    if (o) for (int64_t i = 0; i < n; i++) o[i] = (int32_t)g[i];
    return o;
}
#define ROW_KERNELS(T, SUF) \
static T *conv_##SUF(const double *v, int64_t n) { \
    T *o = (T *)calloc(n > 0 ? n : 1, sizeof(T)); \
    if (o && v) for (int64_t i = 0; i < n; i++) o[i] = (T)v[i]; \
    return o; \
} \
static void k4_##SUF(job_t *j) { \
    const T *restrict x = (const T *)j->x; T *restrict out = (T *)j->out; const int32_t C = (int32_t)j->C; \
    const int64_t A = j->A; int32_t *restrict g = idx32(j->g, C); \
    T *restrict s = conv_##SUF(j->s, C), *restrict t = conv_##SUF(j->t, C); \
    for (int64_t r = j->n0; r < j->n1; r++) { \
        const T *restrict xr = x + r * A; T *restrict o = out + r * C; \
        for (int32_t c = 0; c < C; c++) o[c] = xr[g[c]] * s[c] + t[c]; \
    } \
    free(g); free(s); free(t); \
} \
static void k5_##SUF(job_t *j) { \
    const T *restrict x = (const T *)j->x, *restrict gy = (const T *)j->gy; const int32_t C = (int32_t)j->C; \
    const int64_t A = j->A; int32_t *restrict g = idx32(j->g, C); \
    T *restrict t = conv_##SUF(j->t, C), *restrict b1 = conv_##SUF(0, C), *restrict b2 = conv_##SUF(0, C); \
    for (int64_t r0 = j->n0; r0 < j->n1; r0 += ROWB) { \
        int64_t r1 = r0 + ROWB < j->n1 ? r0 + ROWB : j->n1; \
        memset(b1, 0, sizeof(T) * C); memset(b2, 0, sizeof(T) * C); \
        for (int64_t r = r0; r < r1; r++) { \
            const T *restrict xr = x + r * A, *restrict gr = gy + r * C; \
            for (int32_t c = 0; c < C; c++) { b1[c] += gr[c]; b2[c] += gr[c] * (xr[g[c]] - t[c]); } \
        } \
        for (int32_t c = 0; c < C; c++) { j->acc1[c] += (double)b1[c]; j->acc2[c] += (double)b2[c]; } \
    } \
    free(g); free(t); free(b1); free(b2); \
} \
static void k6_##SUF(job_t *j) { \
    const T *restrict x = (const T *)j->x, *restrict gy = (const T *)j->gy; T *restrict out = (T *)j->out; \
    const int64_t A = j->A; const int32_t C = (int32_t)j->C; int32_t *restrict g = idx32(j->g, C); \
    T *restrict s = conv_##SUF(j->s, C), *restrict p = conv_##SUF(j->p, A), *restrict q = conv_##SUF(j->q, A); \
    for (int64_t r = j->n0; r < j->n1; r++) { \
        const T *restrict xr = x + r * A, *restrict gr = gy + r * C; T *restrict o = out + r * A; \
        _Pragma("omp simd") for (int64_t a = 0; a < A; a++) o[a] = xr[a] * p[a] + q[a]; \
        for (int32_t c = 0; c < C; c++) o[g[c]] += gr[c] * s[c]; \
    } \
    free(g); free(s); free(p); free(q); \
} \
static void k7_##SUF(job_t *j) { \
    const T *restrict x = (const T *)j->x; const int64_t A = j->A; \
    T *restrict b1 = conv_##SUF(0, A), *restrict b2 = conv_##SUF(0, A); \
    for (int64_t r0 = j->n0; r0 < j->n1; r0 += ROWB) { \
        int64_t r1 = r0 + ROWB < j->n1 ? r0 + ROWB : j->n1; \
        memset(b1, 0, sizeof(T) * A); memset(b2, 0, sizeof(T) * A); \
        for (int64_t r = r0; r < r1; r++) { \
            const T *restrict xr = x + r * A; \
            _Pragma("omp simd") for (int64_t a = 0; a < A; a++) { T d = xr[a] - x[a]; b1[a] += d; b2[a] += d * d; } \
        } \
        for (int64_t a = 0; a < A; a++) { j->acc1[a] += (double)b1[a]; j->acc2[a] += (double)b2[a]; } \
    } \
    free(b1); free(b2); \
}

KERNELS(float, f32)
KERNELS(double, f64)
ROW_KERNELS(float, f32)
ROW_KERNELS(double, f64)

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    if (j->dbl) {
        switch (j->kind) {
            case 0: k0_f64(j); break;
            case 1: k1_f64(j); break;
            case 2: k2_f64(j); break;
            case 3: k3_f64(j); break;
            case 4: k4_f64(j); break;
            case 5: k5_f64(j); break;
            case 6: k6_f64(j); break;
            default: k7_f64(j);
        }
    } else {
        switch (j->kind) {
            case 0: k0_f32(j); break;
            case 1: k1_f32(j); break;
            case 2: k2_f32(j); break;
            case 3: k3_f32(j); break;
            case 4: k4_f32(j); break;
            case 5: k5_f32(j); break;
            case 6: k6_f32(j); break;
            default: k7_f32(j);
        }
    }
    return 0;
}

/* For kinds 1/5 and 3/7, acc1/acc2 receive the totals (R = C or A doubles); scratch holds 2*R*nthreads doubles.
   Kinds 3/7 return mean (acc1) and biased variance (acc2). Rows kinds (4-7) take S = 1 and N = rows.
   Returns the number of threads used. */
int egg_oc_run(int kind, int dbl, const void *x, const void *gy, void *out, const int64_t *g,
               const double *s, const double *t, const double *p, const double *q,
               double *acc1, double *acc2, double *scratch,
               int64_t N, int64_t A, int64_t C, int64_t S, int nthreads) {
    job_t jobs[MAXT]; pthread_t th[MAXT]; int ok[MAXT];
    int red = kind == 1 || kind == 3 || kind == 5 || kind == 7, stats = kind == 3 || kind == 7;
    int64_t R = stats ? A : C;
    if (nthreads > MAXT) nthreads = MAXT;
    if (nthreads > N) nthreads = (int)N;
    if (nthreads < 1) nthreads = 1;
    if (red) memset(scratch, 0, sizeof(double) * 2 * R * nthreads);
    int64_t chunk = (N + nthreads - 1) / nthreads;
    for (int k = 0; k < nthreads; k++) {
        job_t *j = &jobs[k];
        j->kind = kind; j->dbl = dbl; j->x = x; j->gy = gy; j->out = out; j->g = g;
        j->s = s; j->t = t; j->p = p; j->q = q; j->A = A; j->C = C; j->S = S;
        j->acc1 = scratch ? scratch + (2 * k) * R : 0; j->acc2 = scratch ? scratch + (2 * k + 1) * R : 0;
        j->n0 = k * chunk < N ? k * chunk : N; j->n1 = (k + 1) * chunk < N ? (k + 1) * chunk : N;
    }
#ifdef EGG_OC_OPENMP
    (void)th; (void)ok;
    /* the process's OpenMP runtime: torch's own libgomp when torch uses one (same soname), so its warm pool */
    #pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int k = 0; k < nthreads; k++) run_job(&jobs[k]);
#else
    for (int k = 1; k < nthreads; k++) ok[k] = pthread_create(&th[k], 0, run_job, &jobs[k]) == 0;
    run_job(&jobs[0]);
    for (int k = 1; k < nthreads; k++) { if (ok[k]) pthread_join(th[k], 0); else run_job(&jobs[k]); }
#endif
    if (red) {
        for (int64_t r = 0; r < R; r++) {
            double a1 = 0, a2 = 0;
            for (int k = 0; k < nthreads; k++) { a1 += jobs[k].acc1[r]; a2 += jobs[k].acc2[r]; }
            acc1[r] = a1; acc2[r] = a2;
        }
        if (stats) {
            double M = (double)N * (double)S;
            for (int64_t a = 0; a < A; a++) {
                double k0 = dbl ? ((const double *)x)[a * S] : (double)((const float *)x)[a * S];
                double d = acc1[a] / M, v = acc2[a] / M - d * d;
                acc1[a] = k0 + d; acc2[a] = v > 0 ? v : 0;
            }
        }
    }
    return nthreads;
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("EGG_OPTIM_CACHE")
    if root:
        return Path(root)
    return Path.home() / ".cache" / "egg_optim"


# OpenMP first (the kernels then run on the OpenMP pool torch already keeps warm), else pthreads; -march=native
# where the compiler takes it.
_FLAG_SETS = (
    ["-fopenmp", "-DEGG_OC_OPENMP", "-march=native"],
    ["-fopenmp", "-DEGG_OC_OPENMP"],
    ["-march=native"],
    [],
)


def _compile(cc: str, out: Path) -> None:
    base = [cc, "-O3", "-fopenmp-simd", "-shared", "-fPIC", "-pthread", "-x", "c", "-", "-o"]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        errors = []
        for extra in _FLAG_SETS:
            cmd = base[:1] + extra + base[1:] + [tmp]
            r = subprocess.run(cmd, input=_SOURCE.encode(), capture_output=True, timeout=120)
            if r.returncode == 0:
                os.replace(tmp, out)  # atomic: concurrent builders all end with a complete file
                return
            errors.append(r.stderr.decode(errors="replace")[-2000:])
        raise RuntimeError("C compiler failed:\n" + "\n".join(errors))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL | None:
    """The kernel library, building it on first use; ``None`` when unavailable (see :func:`error`)."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("EGG_OPTIM_NO_KERNEL", "") not in ("", "0"):
                raise RuntimeError("disabled by EGG_OPTIM_NO_KERNEL")
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
            if not cc:
                raise RuntimeError("no C compiler found (set CC)")
            key = hashlib.sha256(
                "\0".join([_SOURCE, repr(_FLAG_SETS), cc, platform.machine(), platform.system(), _cpu_id()]).encode()
            ).hexdigest()[:20]
            name = f"oc_kernels_{key}.so"
            path = _cache_dir() / name
            if not path.exists():
                try:
                    _compile(cc, path)
                except OSError:  # cache folder not writable: a private temporary folder
                    private = Path(tempfile.gettempdir()) / f"egg_optim-{os.getuid() if hasattr(os, 'getuid') else 0}"
                    private.mkdir(mode=0o700, exist_ok=True)
                    path = private / name
                    if not path.exists():
                        _compile(cc, path)
            lib = ctypes.CDLL(str(path))
            fn = lib.egg_oc_run
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int, ctypes.c_int] + [_P] * 11 + [_I64] * 4 + [ctypes.c_int]
            _lib = lib
        except Exception as exc:  # any failure: fall back to torch ops
            _error = f"{type(exc).__name__}: {exc}"
            _lib = None
        _tried = True
    return _lib


def error() -> str | None:
    """Why the kernels are unavailable (``None`` if they loaded or were not tried yet)."""
    return _error


def _ptr(t: torch.Tensor | None):
    return None if t is None else _P(t.data_ptr())


def run(
    kind: int,
    x: torch.Tensor,
    gy: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    acc1: torch.Tensor | None = None,
    acc2: torch.Tensor | None = None,
    C: int = 0,
) -> None:
    """Call kernel ``kind``. Every tensor must be contiguous on the CPU: ``x``/``gy``/``out`` of one float dtype
    (shapes ``N,A,*``/``N,C,*``), ``g`` int64, the per-channel vectors float64."""
    lib = _lib if _tried else load()
    if lib is None:
        raise RuntimeError(f"the native output-cloning kernels are unavailable ({_error})")
    N, A = x.shape[0], x.shape[1]
    S = x[0, 0].numel() if N and A else 0
    nt = max(1, torch.get_num_threads())
    scratch = None
    if kind in (1, 3, 5, 7):
        R = A if kind in (3, 7) else C
        scratch = torch.empty(2 * R * min(nt, max(N, 1), 64), dtype=torch.float64)
    lib.egg_oc_run(
        kind,
        1 if x.dtype == torch.float64 else 0,
        _ptr(x),
        _ptr(gy),
        _ptr(out),
        _ptr(g),
        _ptr(s),
        _ptr(t),
        _ptr(p),
        _ptr(q),
        _ptr(acc1),
        _ptr(acc2),
        _ptr(scratch),
        N,
        A,
        C,
        S,
        nt,
    )
