/* The CBLAS names MLX (libmlx.so: cblas_sgemm, cblas_dgemm, cblas_cgemm) and bonsai-mlx (cblas_sgemv,
 * openblas_set_num_threads) call, forwarded to PyPI's scipy-openblas32, which exports them with a `scipy_` prefix.
 * bonsai_mlx/cpu/blas.py loads libscipy_openblas.so and then this shim with RTLD_GLOBAL before mlx.core, so these
 * definitions come first in the process's symbol scope (the `scipy_` symbols are resolved from it at load time).
 * LAPACK calls stay on the reference LAPACK that libmlx.so links. */
typedef struct { float re, im; } bonsai_c64;

void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
void scipy_cblas_dgemm(int, int, int, int, int, int, double, const double*, int, const double*, int, double, double*,
                       int);
void scipy_cblas_cgemm(int, int, int, int, int, int, const void*, const void*, int, const void*, int, const void*,
                       void*, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
void scipy_openblas_set_num_threads(int);

void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  scipy_cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int o, int ta, int tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  scipy_cblas_dgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int o, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int lda, const void* b,
                 int ldb, const void* beta, void* c, int ldc) {
  scipy_cblas_cgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_sgemv(int o, int t, int m, int n, float alpha, const float* a, int lda, const float* x, int incx,
                 float beta, float* y, int incy) {
  scipy_cblas_sgemv(o, t, m, n, alpha, a, lda, x, incx, beta, y, incy);
}

void openblas_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }
