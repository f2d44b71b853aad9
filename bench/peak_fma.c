/* The CPU's fp32 FMA peak: twelve independent 512-bit FMA chains per thread, one thread per core.
 *   gcc -O2 -mavx512f -mfma -fopenmp bench/peak_fma.c -o /tmp/peak_fma && /tmp/peak_fma
 * (the chains start apart: equal ones are folded into one by the compiler). */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <omp.h>
int main(){
  double best=0;
  for(int rep=0;rep<5;rep++){
  double t0=omp_get_wtime();
  long iters=20000000;
  float s=0;
  #pragma omp parallel reduction(+:s)
  {
    __m512 a0=_mm512_set1_ps(1.0f),a1=_mm512_set1_ps(1.1f),a2=_mm512_set1_ps(1.2f),a3=_mm512_set1_ps(1.3f),a4=_mm512_set1_ps(1.4f),a5=_mm512_set1_ps(1.5f),a6=_mm512_set1_ps(1.6f),a7=_mm512_set1_ps(1.7f),a8=_mm512_set1_ps(1.8f),a9=_mm512_set1_ps(1.9f),a10=_mm512_set1_ps(2.0f),a11=_mm512_set1_ps(2.1f);
    __m512 b=_mm512_set1_ps(0.999999f), c=_mm512_set1_ps(1e-7f);
    for(long i=0;i<iters;i++){
      a0=_mm512_fmadd_ps(a0,b,c);a1=_mm512_fmadd_ps(a1,b,c);a2=_mm512_fmadd_ps(a2,b,c);a3=_mm512_fmadd_ps(a3,b,c);
      a4=_mm512_fmadd_ps(a4,b,c);a5=_mm512_fmadd_ps(a5,b,c);a6=_mm512_fmadd_ps(a6,b,c);a7=_mm512_fmadd_ps(a7,b,c);
      a8=_mm512_fmadd_ps(a8,b,c);a9=_mm512_fmadd_ps(a9,b,c);a10=_mm512_fmadd_ps(a10,b,c);a11=_mm512_fmadd_ps(a11,b,c);
    }
    __m512 t=_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3)),_mm512_add_ps(_mm512_add_ps(a4,a5),_mm512_add_ps(a6,a7)));
    t=_mm512_add_ps(t,_mm512_add_ps(_mm512_add_ps(a8,a9),_mm512_add_ps(a10,a11)));
    s+=_mm512_reduce_add_ps(t);
  }
  double dt=omp_get_wtime()-t0;
  double gf=2.0*16*12*iters*omp_get_max_threads()/dt/1e9;
  if(gf>best)best=gf;
  printf("%.1f GFLOP/s (%f)\n",gf,s);
  }
}
