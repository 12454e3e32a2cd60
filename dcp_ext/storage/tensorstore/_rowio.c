/* dcp_ext.storage.tensorstore._rowio: crc32c, preadv and pwritev over the rows of a strided array, without the GIL.
 *
 * A "row set" is a base address, a row length in bytes and, for the leading dimensions, their
 * counts and byte strides (C order: the last leading dimension varies fastest). A 2-D tile of a
 * bigger tensor is one leading dimension: (rows,) and (row stride,). With no leading dimension
 * there is one row. The zarr3 chunk code in dcp_ext/storage/tensorstore/native.py reads a chunk
 * file straight into the rows of the destination tensor and writes one straight from the rows of
 * the source, computing the chunk's crc32c over the rows, with no scratch copy in between.
 *
 * The hardware crc32c below (three-way interleaved SSE4.2 crc32 instructions, combined with
 * zero-shift tables) and the portable table fallback are adapted from Mark Adler's crc32c.c,
 * whose notice follows. Altered: intrinsics instead of inline assembly, a target attribute
 * instead of -msse4.2 (so the module builds with any x86-64 gcc/clang and picks the hardware
 * path at run time), and the row-set API.
 *
 * crc32c.c -- compute CRC-32C using the Intel crc32 instruction
 * Copyright (C) 2013 Mark Adler
 * Version 1.1  1 Aug 2013  Mark Adler
 *
 * This software is provided 'as-is', without any express or implied
 * warranty.  In no event will the author be held liable for any damages
 * arising from the use of this software.
 *
 * Permission is granted to anyone to use this software for any purpose,
 * including commercial applications, and to alter it and redistribute it
 * freely, subject to the following restrictions:
 *
 * 1. The origin of this software must not be misrepresented; you must not
 *    claim that you wrote the original software. If you use this software
 *    in a product, an acknowledgment in the product documentation would be
 *    appreciated but is not required.
 * 2. Altered source versions must be plainly marked as such, and must not be
 *    misrepresented as being the original software.
 * 3. This notice may not be removed or altered from any source distribution.
 *
 * Mark Adler
 * madler@alumni.caltech.edu
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <unistd.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ROWIO_X86 1
#include <nmmintrin.h>
#include <immintrin.h>
#endif

#define MAX_DIMS 64

/* Pieces up to this long have the next one prefetched while the crc runs over one: a new row is
 * in another page, where the hardware prefetcher starts over, and the crc32 chain alone keeps too
 * few loads in flight to hide memory latency (cold 512x512 fp32 tiles: 6 -> 7.5 GB/s). */
#define PREFETCH_PIECE 16384

/* Prefetch buffer k + 1 while buffer k is hashed, when it is short enough (see above). */
static inline void prefetch_next(const struct iovec *iov, Py_ssize_t k, Py_ssize_t n)
{
    if (k + 1 < n && iov[k + 1].iov_len <= PREFETCH_PIECE)
        for (size_t o = 0; o < iov[k + 1].iov_len; o += 64)
            __builtin_prefetch((const char *)iov[k + 1].iov_base + o, 0, 3);
}
#define POLY 0x82f63b78u

/* -- portable crc32c: eight tables, eight bytes at a time ------------------------------------ */

static uint32_t crc32c_table[8][256];

static void crc32c_init_sw(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ POLY : crc >> 1;
        crc32c_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc32c_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = crc32c_table[0][crc & 0xff] ^ (crc >> 8);
            crc32c_table[k][n] = crc;
        }
    }
}

static uint32_t crc32c_sw(uint32_t crci, const unsigned char *next, size_t len)
{
    uint64_t crc = crci ^ 0xffffffffu;
    while (len && ((uintptr_t)next & 7) != 0) {
        crc = crc32c_table[0][(crc ^ *next++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, next, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        word = __builtin_bswap64(word);
#endif
        crc ^= word;
        crc = crc32c_table[7][crc & 0xff] ^ crc32c_table[6][(crc >> 8) & 0xff] ^
              crc32c_table[5][(crc >> 16) & 0xff] ^ crc32c_table[4][(crc >> 24) & 0xff] ^
              crc32c_table[3][(crc >> 32) & 0xff] ^ crc32c_table[2][(crc >> 40) & 0xff] ^
              crc32c_table[1][(crc >> 48) & 0xff] ^ crc32c_table[0][crc >> 56];
        next += 8;
        len -= 8;
    }
    while (len) {
        crc = crc32c_table[0][(crc ^ *next++) & 0xff] ^ (crc >> 8);
        len--;
    }
    return (uint32_t)crc ^ 0xffffffffu;
}

/* -- hardware crc32c: three interleaved streams, combined by shifting with zero tables --------- */

#ifdef ROWIO_X86

static uint32_t gf2_matrix_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_matrix_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_matrix_times(mat, mat[n]);
}

/* The operator applying len zero bytes to a crc (len a power of two). */
static void crc32c_zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = POLY;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_matrix_square(even, odd);  /* two zero bits */
    gf2_matrix_square(odd, even);  /* four zero bits */
    do {
        gf2_matrix_square(even, odd);
        len >>= 1;
        if (len == 0)
            return;
        gf2_matrix_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof(odd));
}

static void crc32c_zeros(uint32_t zeros[][256], size_t len)
{
    uint32_t op[32];
    crc32c_zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = gf2_matrix_times(op, n);
        zeros[1][n] = gf2_matrix_times(op, n << 8);
        zeros[2][n] = gf2_matrix_times(op, n << 16);
        zeros[3][n] = gf2_matrix_times(op, n << 24);
    }
}

static inline uint32_t crc32c_shift(uint32_t zeros[][256], uint32_t crc)
{
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^
           zeros[2][(crc >> 16) & 0xff] ^ zeros[3][crc >> 24];
}

/* Three-way interleaving on blocks of these sizes (powers of two), largest first: the 8 KiB and
 * 256-byte blocks of Adler's code, and a 64-byte one added for rows of a few KiB (a 2 KiB row
 * otherwise ends with 512 bytes done one word at a time, at a third of the speed). */
#define TIERS 3
static const size_t tier_block[TIERS] = {8192, 256, 64};
static uint32_t tier_zeros[TIERS][4][256];

static void crc32c_init_hw(void)
{
    for (int t = 0; t < TIERS; t++)
        crc32c_zeros(tier_zeros[t], tier_block[t]);
}

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

#ifdef __x86_64__
#define CRC_WORD(crc, p) _mm_crc32_u64((crc), load64(p))
#define WORD 8
#else
#define CRC_WORD(crc, p) _mm_crc32_u32((uint32_t)(crc), (uint32_t)load64(p))
#define WORD 4
#endif

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const unsigned char *next, size_t len)
{
    uint64_t crc0 = crc ^ 0xffffffffu, crc1, crc2;
    const unsigned char *end;

    while (len && ((uintptr_t)next & 7) != 0) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    for (int tier = 0; tier < TIERS; tier++) {
        const size_t block = tier_block[tier];
        while (len >= block * 3) {
            crc1 = 0;
            crc2 = 0;
            end = next + block;
            do {
                crc0 = CRC_WORD(crc0, next);
                crc1 = CRC_WORD(crc1, next + block);
                crc2 = CRC_WORD(crc2, next + 2 * block);
                next += WORD;
            } while (next < end);
            crc0 = crc32c_shift(tier_zeros[tier], (uint32_t)crc0) ^ (uint32_t)crc1;
            crc0 = crc32c_shift(tier_zeros[tier], (uint32_t)crc0) ^ (uint32_t)crc2;
            next += block * 2;
            len -= block * 3;
        }
    }
    end = next + (len - (len % WORD));
    while (next < end) {
        crc0 = CRC_WORD(crc0, next);
        next += WORD;
    }
    len %= WORD;
    while (len) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    return (uint32_t)crc0 ^ 0xffffffffu;
}


/* -- crc32c by carry-less multiplication (VPCLMULQDQ folding) -----------------------------------
 *
 * The crc32 instruction chain above does at most 8 bytes a cycle per core (~24 GB/s here), about
 * half of xxh3_64, the hash of our byte-file backend; zarr3 chunks must carry crc32c. Folding
 * (Intel, "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction", 2009)
 * keeps running remainders in four 512-bit registers (sixteen 128-bit lanes) and folds 256 bytes
 * a step: each 128-bit lane's two 64-bit halves are multiplied (carry-less) by x^(2048+32) and
 * x^(2048-32) mod P (bit-reflected, as crc32c is) and the next bytes are added. At the end the
 * registers fold into one (distance 512 bits), its four lanes into one (128 bits), the crc32
 * instruction reduces those 16 bytes and then runs over the bytes that did not fill a step. The
 * stream runs over a list of buffers (the rows of a tile), carrying the registers across them.
 * Constants: bit-reflected x^n mod P (P = 0x1EDC6F41), shifted left by one. Used where the CPU
 * has AVX-512 VPCLMULQDQ (a 128-bit PCLMULQDQ version measured no faster than the crc32 chain
 * here); use_fold(False) turns it off (the tests check both paths). */

#define FOLD_STEP 256
#define FOLD_MIN 1024 /* shorter streams: the crc32 instruction chain */

static int fold_ok = 0;  /* folding in use */
static int fold_cpu = 0; /* the CPU can fold */

#define FOLD_TARGET __attribute__((target("avx512f,avx512vl,avx512dq,vpclmulqdq,pclmul,sse4.2")))

FOLD_TARGET static inline __m512i fold64(__m512i x, __m512i k)
{
    return _mm512_xor_si512(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11));
}

FOLD_TARGET static inline __m128i fold16(__m128i x, __m128i k)
{
    return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

typedef struct {
    __m512i z[4];
    int started;
    uint32_t init; /* the raw (inverted) crc to add into the first bytes */
    size_t staged;
    unsigned char stage[FOLD_STEP];
} Fold;

FOLD_TARGET static inline void fold_step(Fold *f, const unsigned char *p, __m512i k)
{
    __m512i d0 = _mm512_loadu_si512((const void *)p), d1 = _mm512_loadu_si512((const void *)(p + 64));
    __m512i d2 = _mm512_loadu_si512((const void *)(p + 128)), d3 = _mm512_loadu_si512((const void *)(p + 192));
    if (!f->started) {
        f->z[0] = _mm512_xor_si512(d0, _mm512_castsi128_si512(_mm_cvtsi32_si128((int)f->init)));
        f->z[1] = d1;
        f->z[2] = d2;
        f->z[3] = d3;
        f->started = 1;
        return;
    }
    f->z[0] = _mm512_xor_si512(fold64(f->z[0], k), d0);
    f->z[1] = _mm512_xor_si512(fold64(f->z[1], k), d1);
    f->z[2] = _mm512_xor_si512(fold64(f->z[2], k), d2);
    f->z[3] = _mm512_xor_si512(fold64(f->z[3], k), d3);
}

FOLD_TARGET static void fold_feed(Fold *f, const unsigned char *p, size_t len)
{
    const __m512i k = _mm512_set4_epi64(0xb9e02b86, 0xdcb17aa4, 0xb9e02b86, 0xdcb17aa4); /* x^2016, x^2080 */
    if (f->staged) {
        size_t take = FOLD_STEP - f->staged < len ? FOLD_STEP - f->staged : len;
        memcpy(f->stage + f->staged, p, take);
        f->staged += take;
        p += take;
        len -= take;
        if (f->staged < FOLD_STEP)
            return;
        fold_step(f, f->stage, k);
        f->staged = 0;
    }
    while (len >= FOLD_STEP) {
        fold_step(f, p, k);
        p += FOLD_STEP;
        len -= FOLD_STEP;
    }
    memcpy(f->stage, p, len);
    f->staged = len;
}

/* The crc32c (post-inverted) once everything was fed; at least one step must have been folded. */
FOLD_TARGET static uint32_t fold_finish(Fold *f)
{
    const __m512i k512 = _mm512_set4_epi64(0x9e4addf8, 0x740eef02, 0x9e4addf8, 0x740eef02); /* x^480, x^544 */
    const __m128i k128 = _mm_set_epi64x(0x14cd00bd6, 0xf20c0dfe);                         /* x^96, x^160 */
    __m512i z = _mm512_xor_si512(fold64(f->z[0], k512), f->z[1]);
    z = _mm512_xor_si512(fold64(z, k512), f->z[2]);
    z = _mm512_xor_si512(fold64(z, k512), f->z[3]);
    __m128i x = _mm_xor_si128(fold16(_mm512_extracti64x2_epi64(z, 0), k128), _mm512_extracti64x2_epi64(z, 1));
    x = _mm_xor_si128(fold16(x, k128), _mm512_extracti64x2_epi64(z, 2));
    x = _mm_xor_si128(fold16(x, k128), _mm512_extracti64x2_epi64(z, 3));
    uint64_t c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(x));
    c = _mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(x, 1));
    return crc32c_hw((uint32_t)c ^ 0xffffffffu, f->stage, f->staged);
}

/* crc32c (post-inverted, like crc32c_hw) of the concatenated buffers, continuing from crc; their
 * total length must be at least FOLD_STEP. */
static uint32_t crc32c_fold(uint32_t crc, const struct iovec *iov, Py_ssize_t n)
{
    Fold f;
    f.started = 0;
    f.staged = 0;
    f.init = crc ^ 0xffffffffu;
    for (Py_ssize_t k = 0; k < n; k++) {
        prefetch_next(iov, k, n);
        fold_feed(&f, (const unsigned char *)iov[k].iov_base, iov[k].iov_len);
    }
    return fold_finish(&f);
}

#endif /* ROWIO_X86 */

static int hardware = 0;

static uint32_t crc32c_any(uint32_t crc, const unsigned char *buf, size_t len)
{
#ifdef ROWIO_X86
    if (fold_ok && len >= FOLD_MIN) {
        struct iovec one = {(void *)buf, len};
        return crc32c_fold(crc, &one, 1);
    }
    if (hardware)
        return crc32c_hw(crc, buf, len);
#endif
    return crc32c_sw(crc, buf, len);
}

/* -- row sets ----------------------------------------------------------------------------------- */

typedef struct {
    uintptr_t base;
    Py_ssize_t row_bytes;
    int ndim;                      /* leading dimensions */
    Py_ssize_t counts[MAX_DIMS];
    Py_ssize_t strides[MAX_DIMS];
    Py_ssize_t nrows;              /* product of counts (1 with no leading dimension) */
} RowSet;

/* The start of each row in turn: rowset_next(&rs, idx, &ptr) with idx zeroed and ptr = base. */
static inline void rowset_advance(const RowSet *rs, Py_ssize_t *idx, uintptr_t *ptr)
{
    for (int d = rs->ndim - 1; d >= 0; d--) {
        if (++idx[d] < rs->counts[d]) {
            *ptr += (uintptr_t)rs->strides[d];
            return;
        }
        *ptr -= (uintptr_t)(rs->strides[d] * (rs->counts[d] - 1));
        idx[d] = 0;
    }
}

static Py_ssize_t as_size(PyObject *o, const char *name, int allow_negative)
{
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s does not fit in a signed %zu-byte size", name, sizeof(Py_ssize_t));
        }
        return -1;
    }
    if (v < 0 && !allow_negative) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative (got %zd)", name, v);
        return -1;
    }
    return v;
}

/* Parse (address, row_bytes, counts, strides) into rs; 0 on success, -1 with an exception set. */
static int parse_rowset(PyObject *address, PyObject *row_bytes, PyObject *counts, PyObject *strides, RowSet *rs)
{
    if (!PyLong_Check(address)) {
        PyErr_SetString(PyExc_TypeError, "address must be an int (e.g. ndarray.ctypes.data)");
        return -1;
    }
    unsigned long long addr = PyLong_AsUnsignedLongLong(address);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "address must be a non-negative int that fits in a pointer");
        return -1;
    }
    if ((unsigned long long)(uintptr_t)addr != addr) {
        PyErr_SetString(PyExc_ValueError, "address does not fit in a pointer");
        return -1;
    }
    rs->base = (uintptr_t)addr;
    rs->row_bytes = as_size(row_bytes, "row_bytes", 0);
    if (rs->row_bytes < 0)
        return -1;
    PyObject *cs = PySequence_Fast(counts, "counts must be a sequence of ints");
    if (cs == NULL)
        return -1;
    PyObject *ss = PySequence_Fast(strides, "strides must be a sequence of ints");
    if (ss == NULL) {
        Py_DECREF(cs);
        return -1;
    }
    int ok = -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(cs);
    if (n != PySequence_Fast_GET_SIZE(ss)) {
        PyErr_Format(PyExc_ValueError, "counts and strides differ in length (%zd and %zd)", n,
                     PySequence_Fast_GET_SIZE(ss));
        goto done;
    }
    if (n > MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "at most %d leading dimensions (got %zd)", MAX_DIMS, n);
        goto done;
    }
    rs->ndim = (int)n;
    rs->nrows = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t c = as_size(PySequence_Fast_GET_ITEM(cs, i), "a row count", 0);
        if (c < 0)
            goto done;
        Py_ssize_t s = as_size(PySequence_Fast_GET_ITEM(ss, i), "a stride", 1);
        if (s == -1 && PyErr_Occurred())
            goto done;
        rs->counts[i] = c;
        rs->strides[i] = s;
        if (c && rs->nrows > PY_SSIZE_T_MAX / c) {
            PyErr_SetString(PyExc_ValueError, "the number of rows overflows");
            goto done;
        }
        rs->nrows *= c;
    }
    if (rs->row_bytes && rs->nrows > PY_SSIZE_T_MAX / rs->row_bytes) {
        PyErr_SetString(PyExc_ValueError, "rows * row_bytes overflows");
        goto done;
    }
    if (rs->nrows && rs->row_bytes && rs->base == 0) {
        PyErr_SetString(PyExc_ValueError, "address is NULL");
        goto done;
    }
    ok = 0;
done:
    Py_DECREF(cs);
    Py_DECREF(ss);
    return ok;
}

static int crc_rows(const RowSet *rs, uint32_t *crc);

static int parse_crc(PyObject *value, uint32_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (PyErr_Occurred() || v > 0xffffffffull) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "value must be a crc32c, an int in [0, 2**32)");
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

PyDoc_STRVAR(crc32c_rows_doc,
"crc32c_rows(address, row_bytes, counts, strides, value=0) -> int\n\n"
"crc32c of the rows (row_bytes each; leading dimensions of counts[i] rows, strides[i] bytes apart,\n"
"C order) concatenated, continuing from value: crc32c.crc32c(b''.join(rows), value).");

static PyObject *py_crc32c_rows(PyObject *self, PyObject *args)
{
    PyObject *address, *row_bytes, *counts, *strides, *value = NULL;
    RowSet rs;
    uint32_t crc = 0;
    if (!PyArg_ParseTuple(args, "OOOO|O:crc32c_rows", &address, &row_bytes, &counts, &strides, &value))
        return NULL;
    if (parse_rowset(address, row_bytes, counts, strides, &rs) < 0)
        return NULL;
    if (value != NULL && parse_crc(value, &crc) < 0)
        return NULL;
    if (crc_rows(&rs, &crc) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(crc);
}

/* crc32c(data, value=0) with the hardware code where there is one, or the table code. */
static PyObject *crc_buffer(PyObject *args, const char *fmt, int portable)
{
    Py_buffer buf;
    PyObject *value = NULL;
    uint32_t crc = 0;
    if (!PyArg_ParseTuple(args, fmt, &buf, &value))
        return NULL;
    if (value != NULL && parse_crc(value, &crc) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    crc = portable ? crc32c_sw(crc, (const unsigned char *)buf.buf, (size_t)buf.len)
                   : crc32c_any(crc, (const unsigned char *)buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(crc);
}

PyDoc_STRVAR(crc32c_portable_doc,
"crc32c_portable(data, value=0) -> int\n\ncrc32c with the table code (what runs without SSE4.2).");

static PyObject *py_crc32c_portable(PyObject *self, PyObject *args)
{
    return crc_buffer(args, "y*|O:crc32c_portable", 1);
}

PyDoc_STRVAR(crc32c_doc,
"crc32c(data, value=0) -> int\n\ncrc32c of a contiguous buffer, continuing from value.");

static PyObject *py_crc32c(PyObject *self, PyObject *args)
{
    return crc_buffer(args, "y*|O:crc32c", 0);
}

/* The iovecs of a row set (adjacent rows merged); NULL with an exception. */
static struct iovec *make_iov(const RowSet *rs, Py_ssize_t *n_out)
{
    Py_ssize_t cap = (rs->row_bytes ? rs->nrows : 0) + 1;
    if ((size_t)cap > SIZE_MAX / sizeof(struct iovec)) {
        PyErr_NoMemory();
        return NULL;
    }
    struct iovec *iov = PyMem_RawMalloc((size_t)cap * sizeof(struct iovec));
    if (iov == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_ssize_t n = 0;
    if (rs->row_bytes) {
        Py_ssize_t idx[MAX_DIMS] = {0};
        uintptr_t ptr = rs->base;
        for (Py_ssize_t r = 0; r < rs->nrows; r++) {
            if (n && (uintptr_t)iov[n - 1].iov_base + iov[n - 1].iov_len == ptr &&
                iov[n - 1].iov_len <= (size_t)(PY_SSIZE_T_MAX / 2)) {
                iov[n - 1].iov_len += (size_t)rs->row_bytes;
            } else {
                iov[n].iov_base = (void *)ptr;
                iov[n].iov_len = (size_t)rs->row_bytes;
                n++;
            }
            rowset_advance(rs, idx, &ptr);
        }
    }
    *n_out = n;
    return iov;
}

static int iov_max(void)
{
    long m = -1;
#ifdef _SC_IOV_MAX
    m = sysconf(_SC_IOV_MAX);
#endif
    if (m <= 0)
        m = 1024;
    return m > 1024 ? 1024 : (int)m;
}


static uint32_t crc_iov(uint32_t crc, const struct iovec *iov, Py_ssize_t n)
{
#ifdef ROWIO_X86
    if (fold_ok) { /* one stream over all the rows: the lanes carry across them */
        size_t total = 0;
        for (Py_ssize_t k = 0; k < n; k++)
            total += iov[k].iov_len;
        if (total >= FOLD_MIN)
            return crc32c_fold(crc, iov, n);
    }
#endif
    for (Py_ssize_t k = 0; k < n; k++) {
        prefetch_next(iov, k, n);
        crc = crc32c_any(crc, (const unsigned char *)iov[k].iov_base, iov[k].iov_len);
    }
    return crc;
}

/* The crc32c of a row set, continuing from *crc (GIL released); -1 with an exception set. */
static int crc_rows(const RowSet *rs, uint32_t *crc)
{
    Py_ssize_t n;
    struct iovec *iov = make_iov(rs, &n);
    if (iov == NULL)
        return -1;
    Py_BEGIN_ALLOW_THREADS
    *crc = crc_iov(*crc, iov, n);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(iov);
    return 0;
}

/* Transfer all of iov (writing or reading) from offset; bytes moved (fewer: end of file, reads
 * only, or the file system wrote nothing), -1 with errno set on an error. */
static Py_ssize_t transfer(int fd, int write, struct iovec *iov, Py_ssize_t n, off_t offset)
{
    int max = iov_max();
    Py_ssize_t total = 0, i = 0;
    while (i < n) {
        if (iov[i].iov_len == 0) {
            i++;
            continue;
        }
        int batch = (int)(n - i < max ? n - i : max);
        ssize_t got = write ? pwritev(fd, iov + i, batch, offset) : preadv(fd, iov + i, batch, offset);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (got == 0)
            return total;
        total += got;
        offset += got;
        while (i < n && (size_t)got >= iov[i].iov_len) {
            got -= (ssize_t)iov[i].iov_len;
            i++;
        }
        if (got) {
            iov[i].iov_base = (char *)iov[i].iov_base + got;
            iov[i].iov_len -= (size_t)got;
        }
    }
    return total;
}

/* Move the rows (iov[0..n)) and then ext[0..n_ext) between memory and fd at offset. Writing with
 * crc != NULL, the rows go in batches of about `batch` bytes, each hashed into *crc right before
 * it is written (while it is in the cache), and crc_out (ext[0]'s buffer) receives the final crc,
 * little-endian, before the last batch goes out. (Reads hash afterwards, in one go: in batches
 * was no faster.) Bytes moved (fewer: end of file, or nothing more written), -1 with errno set
 * on an error. work: room for IOV_MAX iovecs. */
static Py_ssize_t rows_transfer(int fd, int write, const struct iovec *iov, Py_ssize_t n, const struct iovec *ext,
                                int n_ext, off_t offset, size_t batch, uint32_t *crc, unsigned char *crc_out,
                                struct iovec *work)
{
    int max = iov_max() - n_ext;
    struct iovec *b = work;
    Py_ssize_t total = 0, i = 0;
    size_t o = 0;
    if (crc == NULL || !write)
        batch = 0;
    for (;;) {
        int nb = 0;
        size_t bytes = 0;
        while (i < n && nb < max && (batch == 0 || bytes < batch)) {
            size_t take = iov[i].iov_len - o;
            if (batch && take > batch - bytes)
                take = batch - bytes;
            b[nb].iov_base = (char *)iov[i].iov_base + o;
            b[nb].iov_len = take;
            nb++;
            bytes += take;
            o += take;
            if (o == iov[i].iov_len) {
                i++;
                o = 0;
            }
        }
        int last = i == n;
        if (crc != NULL && write) {
            *crc = crc_iov(*crc, b, nb);
            if (last && crc_out != NULL)
                for (int k = 0; k < 4; k++)
                    crc_out[k] = (unsigned char)(*crc >> (8 * k));
        }
        if (last)
            for (int e = 0; e < n_ext; e++) {
                b[nb++] = ext[e];
                bytes += ext[e].iov_len;
            }
        Py_ssize_t got = transfer(fd, write, b, nb, offset);
        if (got < 0)
            return -1;
        total += got;
        offset += got;
        if ((size_t)got < bytes)
            return total;
        if (last)
            return total;
    }
}

/* preadv_rows, pwritev_rows (no crc) and write_rows_crc. */
static PyObject *rows_io(PyObject *args, int write, int with_crc, const char *fmt)
{
    int fd;
    PyObject *offset_o, *address, *row_bytes, *counts, *strides, *tail_o = NULL, *value_o = NULL, *batch_o = NULL;
    RowSet rs;
    Py_buffer tail = {0};
    int have_tail = 0;
    uint32_t crc = 0;
    unsigned char crc_bytes[4];
    if (!PyArg_ParseTuple(args, fmt, &fd, &offset_o, &address, &row_bytes, &counts, &strides, &tail_o, &value_o,
                          &batch_o))
        return NULL;
    Py_ssize_t offset = as_size(offset_o, "offset", 0);
    if (offset < 0)
        return NULL;
    Py_ssize_t batch = 256 * 1024;
    if (batch_o != NULL && (batch = as_size(batch_o, "batch", 0)) < 0)
        return NULL;
    if (value_o != NULL && parse_crc(value_o, &crc) < 0)
        return NULL;
    if (parse_rowset(address, row_bytes, counts, strides, &rs) < 0)
        return NULL;
    if (tail_o != NULL && tail_o != Py_None) {
        if (PyObject_GetBuffer(tail_o, &tail, write ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0)
            return NULL;
        have_tail = 1;
    }
    struct iovec ext[2];
    int n_ext = 0;
    if (write && with_crc) {
        ext[n_ext].iov_base = crc_bytes;
        ext[n_ext++].iov_len = 4;
    }
    if (have_tail && tail.len) {
        ext[n_ext].iov_base = tail.buf;
        ext[n_ext++].iov_len = (size_t)tail.len;
    }
    Py_ssize_t want = rs.nrows * rs.row_bytes;
    PyObject *result = NULL;
    struct iovec *iov = NULL, *work = NULL;
    for (int e = 0; e < n_ext; e++) {
        if (want > PY_SSIZE_T_MAX - (Py_ssize_t)ext[e].iov_len) {
            PyErr_SetString(PyExc_ValueError, "rows * row_bytes + len(tail) overflows");
            goto done;
        }
        want += (Py_ssize_t)ext[e].iov_len;
    }
    if ((off_t)offset != offset || (off_t)(offset + want) < (off_t)offset) {
        PyErr_SetString(PyExc_ValueError, "offset + size overflows the file offset type");
        goto done;
    }
    Py_ssize_t n_iov;
    iov = make_iov(&rs, &n_iov);
    work = PyMem_RawMalloc((size_t)iov_max() * sizeof(struct iovec));
    if (iov == NULL || work == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t got;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    got = rows_transfer(fd, write, iov, n_iov, ext, n_ext, (off_t)offset, (size_t)batch, with_crc ? &crc : NULL,
                        write && with_crc ? crc_bytes : NULL, work);
    if (got < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if (got < 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (write && got != want) {
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", EIO, "the file system wrote nothing more");
        if (exc != NULL) {
            PyErr_SetObject(PyExc_OSError, exc);
            Py_DECREF(exc);
        }
    } else if (write) {
        result = with_crc ? PyLong_FromUnsignedLong(crc) : Py_NewRef(Py_None);
    } else {
        result = PyLong_FromSsize_t(got);
    }
done:
    PyMem_RawFree(iov);
    PyMem_RawFree(work);
    if (have_tail)
        PyBuffer_Release(&tail);
    return result;
}

PyDoc_STRVAR(preadv_rows_doc,
"preadv_rows(fd, offset, address, row_bytes, counts, strides, tail=None) -> int\n\n"
"Read the file from offset into the rows (see crc32c_rows), then into the writable buffer tail,\n"
"with preadv (up to IOV_MAX buffers a call; short reads resumed). Returns the bytes read: fewer\n"
"than asked where the file ends. OSError on failure.");
PyDoc_STRVAR(pwritev_rows_doc,
"pwritev_rows(fd, offset, address, row_bytes, counts, strides, tail=None) -> None\n\n"
"Write the rows (see crc32c_rows), then the buffer tail, to the file at offset with pwritev\n"
"(resumed until all is written). OSError with the errno on failure.");
PyDoc_STRVAR(write_rows_crc_doc,
"write_rows_crc(fd, offset, address, row_bytes, counts, strides, tail=None, value=0, batch=262144)\n"
"-> crc\n\n"
"Write the rows, their crc32c (continuing from value; 4 bytes, little-endian), then tail, with\n"
"pwritev in batches of about batch bytes, each hashed right before it is written (so the write\n"
"copies it from the cache: a save of 512x512 fp32/bf16 tiles 5-7% faster than hashing the whole\n"
"chunk first; 512 KiB batches no better). Returns the crc.");

#define ROWS_IO_METHOD(name, write, with_crc, fmt) \
    static PyObject *py_##name(PyObject *self, PyObject *args) { return rows_io(args, write, with_crc, fmt); }
ROWS_IO_METHOD(preadv_rows, 0, 0, "iOOOOO|O:preadv_rows")
ROWS_IO_METHOD(pwritev_rows, 1, 0, "iOOOOO|O:pwritev_rows")
ROWS_IO_METHOD(write_rows_crc, 1, 1, "iOOOOO|OOO:write_rows_crc")

static PyObject *py_use_fold(PyObject *self, PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p:use_fold", &on))
        return NULL;
#ifdef ROWIO_X86
    int before = fold_ok;
    fold_ok = on && fold_cpu;
    return PyBool_FromLong(before);
#else
    (void)on;
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(use_fold_doc,
"use_fold(on) -> bool\n\n"
"Compute crc32c by VPCLMULQDQ folding where the CPU can (on, the default) or by the crc32\n"
"instruction chain only (off); returns whether folding was in use. Process-wide.");

static PyMethodDef methods[] = {
    {"use_fold", py_use_fold, METH_VARARGS, use_fold_doc},
    {"crc32c_rows", py_crc32c_rows, METH_VARARGS, crc32c_rows_doc},
    {"crc32c", py_crc32c, METH_VARARGS, crc32c_doc},
    {"crc32c_portable", py_crc32c_portable, METH_VARARGS, crc32c_portable_doc},
    {"preadv_rows", py_preadv_rows, METH_VARARGS, preadv_rows_doc},
    {"pwritev_rows", py_pwritev_rows, METH_VARARGS, pwritev_rows_doc},
    {"write_rows_crc", py_write_rows_crc, METH_VARARGS, write_rows_crc_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dcp_ext.storage.tensorstore._rowio",
    "crc32c, preadv and pwritev over the rows of a strided array, without the GIL (see _rowio.c).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__rowio(void)
{
    crc32c_init_sw();
#ifdef ROWIO_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc32c_init_hw();
        hardware = 1;
        fold_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("vpclmulqdq") &&
                  __builtin_cpu_supports("pclmul");
        fold_cpu = fold_ok;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "FOLD", PyBool_FromLong(fold_ok)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "HARDWARE", PyBool_FromLong(hardware)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
